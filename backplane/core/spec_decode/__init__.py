"""Speculative decoding: cheap proposals of several next tokens, verified exactly.

A proposer guesses up to k tokens per request (``ngram``: copy what followed an
earlier occurrence of the prompt's tail); the target model scores all of them in
one forward pass, and ``rejection_sampler`` keeps the longest prefix the target
agrees with, so the output distribution is exactly the target's.
"""
