#!/usr/bin/env python3
"""Build Backplane's bundled demo model from public-domain text (reproducibility script).

The model that ``backplane serve`` runs when no MODEL is given lives in
``backplane/demo_model/``. This script is how it was made; CI and the tests never
run it. Three stages, which can run on different machines (the corpus needs the
Debian archive, training wants an accelerator)::

    # 1. corpus + tokenizer (needs apt-get or an installed sword-text-web)
    python scripts/train_demo_model.py prepare --work .demo_work
    # 2. train the model (any torch device; bf16 autocast on CUDA)
    python scripts/train_demo_model.py train --work .demo_work --out .demo_work/model
    # 3. copy the result into the package
    python scripts/train_demo_model.py install --out .demo_work/model

``all`` runs the three in a row. See docs/demo_model.md for the figures of the
shipped run.

Corpus: the World English Bible (with Deuterocanon), a modern-English translation
dedicated to the public domain, as packaged by Debian in ``sword-text-web``
(version 426.0-1). The package holds a SWORD "zText" module; it is read here
directly (zlib blocks plus two small index files) so no SWORD library is needed.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import html
import json
import math
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib

DEB_PACKAGE = "sword-text-web"
DEB_VERSION = "426.0-1"
MODULE_SUBDIR = "usr/share/sword/modules/texts/ztext/engWEB2015eb"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.join(REPO_ROOT, "backplane", "demo_model")

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
VOCAB_SIZE = 4096

# Zephyr-style role tags; each turn ends with the EOS token, so a reply that the
# model closes with </s> stops generation with no extra stop string.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

MODEL_SHAPE = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a kind and wise storyteller.",
    "Answer in plain English.",
]


# --------------------------------------------------------------------------- corpus
def fetch_module(work: str) -> str:
    """Return the directory of the engWEB2015eb zText module, fetching the .deb if needed."""
    installed = os.path.join("/", MODULE_SUBDIR)
    if os.path.isdir(installed):
        return installed
    debdir = os.path.join(work, "deb")
    os.makedirs(debdir, exist_ok=True)
    debs = glob.glob(os.path.join(debdir, f"{DEB_PACKAGE}_*.deb"))
    if not debs:
        subprocess.run(
            ["apt-get", "download", f"{DEB_PACKAGE}={DEB_VERSION}"], cwd=debdir, check=True
        )
        debs = glob.glob(os.path.join(debdir, f"{DEB_PACKAGE}_*.deb"))
    with open(debs[0], "rb") as f:
        print(f"{os.path.basename(debs[0])} sha256 {hashlib.sha256(f.read()).hexdigest()}")
    root = os.path.join(debdir, "root")
    subprocess.run(["dpkg-deb", "-x", debs[0], root], check=True)
    return os.path.join(root, MODULE_SUBDIR)


def read_ztext(module_dir: str) -> list[str]:
    """All entries (OSIS markup) of a SWORD zText module, Old then New Testament.

    ``*.bzs`` lists zlib blocks as (offset, size, uncompressed size); ``*.bzv`` lists
    entries as (block, offset in block, size), all little-endian.
    """
    entries = []
    for testament in ("ot", "nt"):
        base = os.path.join(module_dir, testament)
        with open(base + ".bzs", "rb") as f:
            bzs = f.read()
        with open(base + ".bzv", "rb") as f:
            bzv = f.read()
        with open(base + ".bzz", "rb") as f:
            bzz = f.read()
        blocks = [struct.unpack_from("<III", bzs, i) for i in range(0, len(bzs), 12)]
        cache: dict[int, bytes] = {}
        for i in range(0, len(bzv), 10):
            block, offset, size = struct.unpack_from("<IIH", bzv, i)
            if size == 0:
                continue
            if block not in cache:
                start, csize, _ = blocks[block]
                cache[block] = zlib.decompress(bzz[start : start + csize])
            entries.append(cache[block][offset : offset + size].decode("utf-8"))
    return entries


_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})


def osis_to_books(entries: list[str]) -> list[list[str]]:
    """Plain text of each book as a list of paragraphs.

    Footnotes and headings are dropped (they are not running prose); paragraph and
    poetry-line markers become line breaks; typographic quotes become ASCII ones
    so that what a user types matches what the model saw.
    """
    books: list[list[str]] = []
    current: list[str] = []
    for raw in entries:
        # A book opens with <div ... sID=".." type="book"/> (and closes with eID=..).
        if re.search(r'<div\b[^>]*\ssID=[^>]*type="book"|<div\b[^>]*type="book"[^>]*\ssID=', raw):
            if current:
                books.append(current)
            current = []
        # A footnote can sit between two words with no space around it.
        text = re.sub(r"<note\b.*?</note>", " ", raw, flags=re.S)
        text = re.sub(r"<title\b.*?</title>", "", text, flags=re.S)
        text = re.sub(r'<div[^>]*type="x-p"[^>]*/>|<lb\b[^>]*/>|<l\b[^>]*sID=[^>]*/>', "\n", text)
        text = re.sub(r"<[^>]+>", "", text)
        text = html.unescape(text).translate(_QUOTES)
        parts = text.split("\n")
        for j, part in enumerate(parts):
            part = re.sub(r"\s+", " ", part).strip()
            part = re.sub(r" ([,.;:!?])", r"\1", part)
            if j > 0 or not current:
                current.append(part)
            elif part:
                current[-1] = (current[-1] + " " + part).strip()
    if current:
        books.append(current)
    return [[p for p in book if p] for book in books if any(book)]


def train_tokenizer(text: str, out_dir: str) -> None:
    """Byte-level BPE (no unknown bytes) saved as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n"), trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, name
    # Llama convention: a plain prompt is encoded as <s> + text.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    # Portable tokenizer_config.json: the class name and key that transformers 4.x
    # and 5.x both read, and the chat template inline for loaders that ignore
    # chat_template.jinja.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.pop("backend", None)
    cfg.pop("extra_special_tokens", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["additional_special_tokens"] = SPECIAL_TOKENS[4:]
    cfg["chat_template"] = CHAT_TEMPLATE
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    specials = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "additional_special_tokens": SPECIAL_TOKENS[4:],
    }
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2)


def prepare(args) -> None:
    """Stage 1: corpus text and tokenizer into ``args.work``."""
    os.makedirs(args.work, exist_ok=True)
    module = fetch_module(args.work)
    books = osis_to_books(read_ztext(module))
    corpus_path = os.path.join(args.work, "corpus.json")
    with open(corpus_path, "w") as f:
        json.dump(books, f, ensure_ascii=False)
    text = "\n".join(p for book in books for p in book)
    print(
        f"corpus: {len(books)} books, {sum(map(len, books))} paragraphs, "
        f"{len(text.split())} words, {len(text.encode())} bytes"
    )
    train_tokenizer(text, os.path.join(args.work, "tokenizer"))
    print(f"tokenizer saved to {os.path.join(args.work, 'tokenizer')}")


# --------------------------------------------------------------------------- data
def _clip(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` chars at a sentence end when one exists."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = max(cut.rfind(". "), cut.rfind("? "), cut.rfind("! "))
    return cut[: end + 1] if end > limit // 3 else cut.rsplit(" ", 1)[0]


def build_streams(books: list[list[str]], tokenizer, rng: random.Random):
    """Token streams: plain text (books joined by EOS) and chat conversations.

    A conversation is a paragraph as the user turn and the next paragraph as the
    assistant turn, rendered with the chat template, so the model learns the role
    tags and to close its reply with EOS.
    """
    plain: list[int] = []
    for book in books:
        plain.extend(tokenizer("\n".join(book), add_special_tokens=False)["input_ids"])
        plain.append(EOS_ID)
    convs: list[list[int]] = []
    for book in books:
        for a, b in zip(book, book[1:], strict=False):
            messages = []
            if rng.random() < 0.3:
                messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
            messages.append({"role": "user", "content": _clip(a, 300)})
            messages.append({"role": "assistant", "content": _clip(b, 400)})
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            convs.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return plain, convs


VAL_BOOK_EVERY = 16  # books 7, 23, 39, ... are held out for validation


def split_books(books: list[list[str]]) -> tuple[list[list[str]], list[list[str]]]:
    """(training books, held-out books): whole books are held out, so validation
    text is never seen in either training stream."""
    train = [b for i, b in enumerate(books) if i % VAL_BOOK_EVERY != VAL_BOOK_EVERY // 2 - 1]
    val = [b for i, b in enumerate(books) if i % VAL_BOOK_EVERY == VAL_BOOK_EVERY // 2 - 1]
    return train, val


class Batcher:
    """Windows of ``seq_len + 1`` tokens (inputs and shifted targets) from one split.

    Plain windows start anywhere in the text and get a BOS in front, as a prompt
    does at inference; chat windows pack whole conversations from a given one on.
    """

    def __init__(self, plain, convs, seq_len: int, chat_fraction: float, seed: int):
        import torch

        self.torch = torch
        self.seq_len = seq_len
        self.chat_fraction = chat_fraction
        self.rng = random.Random(seed)
        self.plain = plain
        self.convs = convs

    def _plain_window(self, start: int) -> list[int]:
        return [BOS_ID] + self.plain[start : start + self.seq_len]

    def _chat_window(self, first: int) -> list[int]:
        out: list[int] = []
        i = first
        while len(out) < self.seq_len + 1:
            out.extend(self.convs[i % len(self.convs)])
            i += 1
        return out[: self.seq_len + 1]

    def random_batch(self, batch_size: int):
        """Training batch: random windows, ``chat_fraction`` of them chat."""
        rows = []
        for _ in range(batch_size):
            if self.rng.random() < self.chat_fraction:
                rows.append(self._chat_window(self.rng.randrange(len(self.convs))))
            else:
                rows.append(self._plain_window(self.rng.randrange(len(self.plain) - self.seq_len)))
        return self.torch.tensor(rows, dtype=self.torch.long)

    def fixed_batches(self, batch_size: int, max_rows: int = 512):
        """Validation: the same non-overlapping windows every time, per stream."""
        starts = range(0, len(self.plain) - self.seq_len, self.seq_len)
        plain = [self._plain_window(s) for s in list(starts)[:max_rows]]
        chat, i = [], 0
        while i < len(self.convs) and len(chat) < max_rows // 4:
            chat.append(self._chat_window(i))
            i += 8  # ~8 conversations fill one window
        for group, name in ((plain, "plain"), (chat, "chat")):
            for j in range(0, len(group), batch_size):
                yield name, self.torch.tensor(group[j : j + batch_size], dtype=self.torch.long)


# --------------------------------------------------------------------------- training
def train(args) -> None:
    """Stage 2: train the Llama model and save it with the tokenizer to ``args.out``."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.work, "tokenizer"))
    with open(os.path.join(args.work, "corpus.json")) as f:
        books = json.load(f)
    t0 = time.time()
    train_books, val_books = split_books(books)
    plain, convs = build_streams(train_books, tokenizer, random.Random(args.seed))
    val_plain, val_convs = build_streams(val_books, tokenizer, random.Random(args.seed + 1))
    print(
        f"data: {len(plain)} plain tokens, {len(convs)} conversations "
        f"({sum(map(len, convs))} tokens); built in {time.time() - t0:.1f}s",
        flush=True,
    )
    print(f"held out {len(val_books)} books: {len(val_plain)} plain tokens", flush=True)
    batcher = Batcher(plain, convs, args.seq_len, args.chat_fraction, args.seed)
    val_batcher = Batcher(val_plain, val_convs, args.seq_len, args.chat_fraction, args.seed)

    config = LlamaConfig(**MODEL_SHAPE)
    model = LlamaForCausalLM(config).to(device)
    if args.dropout > 0:
        add_residual_dropout(model, args.dropout)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters on {device}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=device == "cuda",
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    use_bf16 = device == "cuda"

    def loss_of(batch):
        batch = batch.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=batch[:, :-1]).logits
        return F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)
        )

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        sums: dict[str, list[float]] = {}
        for name, batch in val_batcher.fixed_batches(args.batch_size):
            sums.setdefault(name, []).append(loss_of(batch).item())
        model.train()
        return {k: sum(v) / len(v) for k, v in sums.items()}

    log = {"train": [], "val": []}
    best = (float("inf"), None, -1)
    model.train()
    t_start = time.time()
    for step in range(args.steps):
        if args.time_limit and time.time() - t_start > args.time_limit:
            print(f"time limit {args.time_limit}s reached at step {step}; stopping early")
            log["stopped_early_at"] = step
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = loss_of(batcher.random_batch(args.batch_size))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            log["train"].append([step, round(loss.item(), 4)])
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            val = evaluate()
            elapsed = time.time() - t_start
            log["val"].append(
                [step + 1, {k: round(v, 4) for k, v in val.items()}, round(elapsed, 1)]
            )
            print(
                f"step {step + 1}: train {loss.item():.3f} val {val} ({elapsed:.0f}s)", flush=True
            )
            if val["plain"] < best[0]:
                best = (
                    val["plain"],
                    {k: v.detach().clone() for k, v in model.state_dict().items()},
                    step + 1,
                )
    train_seconds = time.time() - t_start
    final_step = log.get("stopped_early_at", args.steps)
    if "stopped_early_at" in log:
        val = evaluate()
        log["val"].append([final_step, val, round(train_seconds, 1)])
        if val["plain"] < best[0]:
            best = (val["plain"], None, final_step)
    print(
        f"best held-out loss (plain) {best[0]:.3f} at step {best[2]}; trained {train_seconds:.0f}s"
    )
    props = torch.cuda.get_device_name() if device == "cuda" else f"cpu x{args.threads}"
    log.update(
        device=props,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        chat_fraction=args.chat_fraction,
        dropout=args.dropout,
        parameters=n_params,
        plain_tokens=len(plain),
        conversations=len(convs),
        heldout_books=len(val_books),
        heldout_plain_tokens=len(val_plain),
        best_step=best[2],
        best_val_plain=round(best[0], 4),
        train_seconds=round(train_seconds, 1),
        torch=torch.__version__,
    )
    # The final weights go to --out. Where the held-out loss was lower earlier, the
    # weights of that step go beside them (OUT-best) so the two can be compared.
    outputs = [(args.out, model.state_dict())]
    if best[1] is not None and best[2] != final_step:
        outputs.append((args.out.rstrip("/") + "-best", best[1]))
    for out_dir, state in outputs:
        model.load_state_dict(state)
        save_model(model, out_dir, args.work, log)
        print(f"== samples of {out_dir}")
        samples(out_dir, device)


def add_residual_dropout(model, p: float) -> None:
    """Dropout on the embeddings and on each attention and MLP branch, training only.

    Hugging Face's Llama has no residual dropout, and this corpus is small enough
    that the model memorises it within a few epochs; hooks add the regulariser
    without changing the architecture or the saved checkpoint.
    """
    import torch.nn.functional as F

    def hook(module, inputs, output):
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, module.training), *output[1:])
        return F.dropout(output, p, module.training)

    model.model.embed_tokens.register_forward_hook(hook)
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def save_model(model, out_dir: str, work: str, log: dict) -> None:
    """Write bf16 safetensors, config, generation config, tokenizer files and the log."""
    import torch
    from transformers import GenerationConfig

    os.makedirs(out_dir, exist_ok=True)
    model.config.use_cache = True
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
        max_new_tokens=128,
    )
    dtype = next(model.parameters()).dtype
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    model.to(dtype)
    for name in os.listdir(os.path.join(work, "tokenizer")):
        shutil.copy(os.path.join(work, "tokenizer", name), out_dir)
    with open(os.path.join(out_dir, "train_log.json"), "w") as f:
        json.dump(log, f)


def samples(model_dir: str, device: str = "cpu") -> None:
    """Print greedy continuations and a chat reply of the saved model (bf16 -> float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    prompts = [
        "In the beginning",
        "The king said to his servants,",
        "Love is patient and",
        "And Jesus said to them,",
    ]
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids.to(device)
        out = model.generate(ids, max_new_tokens=40, do_sample=False)
        print(f"[greedy] {prompt!r} -> {tok.decode(out[0, ids.shape[1] :])!r}")
    chat = [{"role": "user", "content": "Tell me about the sea."}]
    ids = tok.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"].to(device)
    out = model.generate(ids, max_new_tokens=60, do_sample=False)
    print(f"[chat] {chat[0]['content']!r} -> {tok.decode(out[0, ids.shape[1] :])!r}")


def install(args) -> None:
    """Stage 3: copy the model files (not the training log) into backplane/demo_model/."""
    model_files = ["config.json", "generation_config.json", "model.safetensors"]
    tokenizer_dir = os.path.join(args.work, "tokenizer")
    for src_dir, names in ((args.out, model_files), (tokenizer_dir, os.listdir(tokenizer_dir))):
        for name in sorted(names):
            shutil.copy(os.path.join(src_dir, name), os.path.join(PACKAGE_DIR, name))
            print(f"installed {name} from {src_dir}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=["prepare", "train", "install", "samples", "all"])
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "demo_model_work"))
    p.add_argument("--out", default=None, help="model output dir (default WORK/model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads when on cpu")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--chat-fraction", type=float, default=0.2)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--dropout", type=float, default=0.1, help="residual dropout in training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--time-limit",
        type=float,
        default=0,
        help="stop training after this many seconds (0: no limit)",
    )
    args = p.parse_args(argv)
    args.out = args.out or os.path.join(args.work, "model")
    if args.stage in ("prepare", "all"):
        prepare(args)
    if args.stage in ("train", "all"):
        train(args)
    if args.stage in ("install", "all"):
        install(args)
    if args.stage == "samples":
        samples(args.out)


if __name__ == "__main__":
    sys.exit(main())
