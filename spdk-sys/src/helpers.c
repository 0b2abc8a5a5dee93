#include "helpers.h"
#include <spdk/log.h>
#include <spdk/thread.h>

uint64_t spdk_sys_bdev_io_offset_blocks(struct spdk_bdev_io *io) { return io->u.bdev.offset_blocks; }
uint64_t spdk_sys_bdev_io_num_blocks(struct spdk_bdev_io *io) { return io->u.bdev.num_blocks; }
struct iovec *spdk_sys_bdev_io_iovs(struct spdk_bdev_io *io, int *iovcnt)
{
	*iovcnt = io->u.bdev.iovcnt;
	return io->u.bdev.iovs;
}
int spdk_sys_bdev_io_type(struct spdk_bdev_io *io) { return io->type; }
struct spdk_bdev *spdk_sys_bdev_io_bdev(struct spdk_bdev_io *io) { return io->bdev; }
void *spdk_sys_bdev_io_driver_ctx(struct spdk_bdev_io *io) { return io->driver_ctx; }
void *spdk_sys_io_channel_get_ctx(struct spdk_io_channel *ch) { return spdk_io_channel_get_ctx(ch); }
void *spdk_sys_bdev_ctxt(struct spdk_bdev *bdev) { return bdev->ctxt; }
const char *spdk_sys_bdev_claim_module_name(struct spdk_bdev *bdev)
{
	struct spdk_bdev_module *m = bdev->internal.claim.v1.module;

	if (bdev->internal.claim_type == SPDK_BDEV_CLAIM_NONE) {
		return NULL;
	}
	if (bdev->internal.claim_type == SPDK_BDEV_CLAIM_EXCL_WRITE && m != NULL) {
		return m->name;
	}
	return "another module";
}
void spdk_sys_log(int level, const char *msg)
{
	spdk_log((enum spdk_log_level)level, NULL, -1, NULL, "%s\n", msg);
}
