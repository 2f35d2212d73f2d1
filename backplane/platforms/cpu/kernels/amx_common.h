/*
 * What every AMX kernel needs (gemm_amx.h, paged_attention.c in AMX builds): the
 * process's permission to use the tile registers and the tile configuration layout.
 */
#ifndef BACKPLANE_AMX_COMMON_H
#define BACKPLANE_AMX_COMMON_H

#include <immintrin.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Linux hands out the 8 KiB of tile state only to processes that ask for it. */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* 0 when this process may use the tile registers (asks the kernel once). */
int amx_enable(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : -1;
}

/* LDTILECFG's 64-byte operand (palette 1): rows and bytes per row of each tile. */
struct tile_config {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

#endif
