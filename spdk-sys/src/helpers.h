/* Access to SPDK static-inline functions, macros and struct fields that
 * bindgen cannot expose directly. Implemented in helpers.c. */
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
/* The bdev it was submitted to. */
struct spdk_bdev *spdk_sys_bdev_io_bdev(struct spdk_bdev_io *io);
/* The per-I/O context the module asked for with get_ctx_size. */
void *spdk_sys_bdev_io_driver_ctx(struct spdk_bdev_io *io);
/* The channel's context area (spdk_io_channel_get_ctx is static inline). */
void *spdk_sys_io_channel_get_ctx(struct spdk_io_channel *ch);
/* The context a bdev was registered with. */
void *spdk_sys_bdev_ctxt(struct spdk_bdev *bdev);
/* Name of the module that claimed a bdev, or NULL. */
const char *spdk_sys_bdev_claim_module_name(struct spdk_bdev *bdev);
/* SPDK_NOTICELOG / SPDK_WARNLOG / SPDK_ERRLOG of one preformatted line. */
void spdk_sys_log(int level, const char *msg);
#endif
