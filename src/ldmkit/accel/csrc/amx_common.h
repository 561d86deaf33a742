// What ldmkit's AMX kernels share (attention_amx.c, gemm_amx.c): asking Linux for the tile
// state, and one tile configuration (eight 16-row x 64-byte tiles) set for the duration of a
// kernel on a thread and then given back, since other kernels on the same thread (oneDNN,
// inductor) cache their own configuration per thread.
#ifndef LDMKIT_AMX_COMMON_H
#define LDMKIT_AMX_COMMON_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} tile_config;

// Linux gives a process the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM
// for XFEATURE_XTILEDATA). 0 on success.
int ldm_amx_request(void) { return (int)syscall(SYS_arch_prctl, 0x1023, 18); }

// Saves this thread's tile configuration in *saved and loads ldmkit's.
static inline void amx_begin(tile_config *saved) {
  _Alignas(64) tile_config cfg;
  _tile_storeconfig(saved);
  memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int i = 0; i < 8; i++) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  _tile_loadconfig(&cfg);
}

// Gives the thread its saved configuration back (or releases the tiles if it had none).
static inline void amx_end(const tile_config *saved) {
  if (saved->palette_id)
    _tile_loadconfig(saved);
  else
    _tile_release();
}

#endif
