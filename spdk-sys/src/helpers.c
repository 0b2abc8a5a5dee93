#include "helpers.h"

uint64_t spdk_sys_bdev_io_offset_blocks(struct spdk_bdev_io *io) { return io->u.bdev.offset_blocks; }
uint64_t spdk_sys_bdev_io_num_blocks(struct spdk_bdev_io *io) { return io->u.bdev.num_blocks; }
struct iovec *spdk_sys_bdev_io_iovs(struct spdk_bdev_io *io, int *iovcnt)
{
	*iovcnt = io->u.bdev.iovcnt;
	return io->u.bdev.iovs;
}
int spdk_sys_bdev_io_type(struct spdk_bdev_io *io) { return io->type; }
void *spdk_sys_bdev_io_driver_ctx(struct spdk_bdev_io *io) { return io->driver_ctx; }
