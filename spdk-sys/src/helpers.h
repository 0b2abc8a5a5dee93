/* Access to SPDK static-inline functions and struct fields that bindgen
 * cannot expose directly. Implemented in helpers.c. */
#ifndef SPDK_SYS_HELPERS_H
#define SPDK_SYS_HELPERS_H
#include <spdk/bdev_module.h>

/* Blocks of a bdev_io's read/write range. */
uint64_t spdk_sys_bdev_io_offset_blocks(struct spdk_bdev_io *io);
uint64_t spdk_sys_bdev_io_num_blocks(struct spdk_bdev_io *io);
/* Its iovecs. */
struct iovec *spdk_sys_bdev_io_iovs(struct spdk_bdev_io *io, int *iovcnt);
/* Its type (SPDK_BDEV_IO_TYPE_*). */
int spdk_sys_bdev_io_type(struct spdk_bdev_io *io);
/* The per-I/O context the module asked for with get_ctx_size. */
void *spdk_sys_bdev_io_driver_ctx(struct spdk_bdev_io *io);
#endif
