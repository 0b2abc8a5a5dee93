/* Registration of the writeboost bdev module and its JSON-RPC methods with
 * SPDK's own macros (constructors), so that both a stock spdk_tgt (through
 * LD_PRELOAD of the shared library) and writeboost_tgt pick them up before
 * the application starts. Every callback is implemented in Rust. */
#include <spdk/stdinc.h>
#include <spdk/bdev_module.h>
#include <spdk/log.h>
#include <spdk/rpc.h>

int wb_module_init(void);
void wb_module_fini(void);
void wb_examine_disk(struct spdk_bdev *bdev);
int wb_config_json(struct spdk_json_write_ctx *w);
int wb_get_ctx_size(void);

int wb_bdev_destruct(void *ctx);
void wb_bdev_submit_request(struct spdk_io_channel *ch, struct spdk_bdev_io *bdev_io);
bool wb_bdev_io_type_supported(void *ctx, enum spdk_bdev_io_type io_type);
struct spdk_io_channel *wb_bdev_get_io_channel(void *ctx);
int wb_bdev_dump_info_json(void *ctx, struct spdk_json_write_ctx *w);

void wb_rpc_create(struct spdk_jsonrpc_request *r, const struct spdk_json_val *p);
void wb_rpc_delete(struct spdk_jsonrpc_request *r, const struct spdk_json_val *p);
void wb_rpc_get_stats(struct spdk_jsonrpc_request *r, const struct spdk_json_val *p);
void wb_rpc_set_options(struct spdk_jsonrpc_request *r, const struct spdk_json_val *p);
void wb_rpc_drop_caches(struct spdk_jsonrpc_request *r, const struct spdk_json_val *p);
void wb_rpc_clear_stats(struct spdk_jsonrpc_request *r, const struct spdk_json_val *p);
void wb_rpc_get_quarantine(struct spdk_jsonrpc_request *r, const struct spdk_json_val *p);
void wb_rpc_drop_quarantine(struct spdk_jsonrpc_request *r, const struct spdk_json_val *p);

static struct spdk_bdev_module writeboost_if = {
	.name = "writeboost",
	.module_init = wb_module_init,
	.module_fini = wb_module_fini,
	.examine_disk = wb_examine_disk,
	.config_json = wb_config_json,
	.get_ctx_size = wb_get_ctx_size,
};

SPDK_BDEV_MODULE_REGISTER(writeboost, &writeboost_if)

static const struct spdk_bdev_fn_table writeboost_fn_table = {
	.destruct = wb_bdev_destruct,
	.submit_request = wb_bdev_submit_request,
	.io_type_supported = wb_bdev_io_type_supported,
	.get_io_channel = wb_bdev_get_io_channel,
	.dump_info_json = wb_bdev_dump_info_json,
};

struct spdk_bdev_module *
wb_module(void)
{
	return &writeboost_if;
}

/* A bdev to register: name and geometry from the caller, entry points and
 * module from here. Freed with wb_bdev_free once destruct is done. */
struct spdk_bdev *
wb_bdev_new(const char *name, uint32_t blocklen, uint64_t blockcnt, bool write_cache,
	    const struct spdk_uuid *uuid, void *ctxt)
{
	struct spdk_bdev *bdev = calloc(1, sizeof(*bdev));

	if (bdev == NULL) {
		return NULL;
	}
	bdev->name = strdup(name);
	if (bdev->name == NULL) {
		free(bdev);
		return NULL;
	}
	bdev->product_name = "writeboost";
	bdev->blocklen = blocklen;
	bdev->blockcnt = blockcnt;
	bdev->write_cache = write_cache ? 1 : 0;
	spdk_uuid_copy(&bdev->uuid, uuid);
	bdev->ctxt = ctxt;
	bdev->fn_table = &writeboost_fn_table;
	bdev->module = &writeboost_if;
	return bdev;
}

void
wb_bdev_free(struct spdk_bdev *bdev)
{
	free(bdev->name);
	free(bdev);
}

SPDK_RPC_REGISTER("bdev_writeboost_create", wb_rpc_create, SPDK_RPC_RUNTIME)
SPDK_RPC_REGISTER("bdev_writeboost_delete", wb_rpc_delete, SPDK_RPC_RUNTIME)
SPDK_RPC_REGISTER("bdev_writeboost_get_stats", wb_rpc_get_stats, SPDK_RPC_RUNTIME)
SPDK_RPC_REGISTER("bdev_writeboost_set_options", wb_rpc_set_options, SPDK_RPC_RUNTIME)
SPDK_RPC_REGISTER("bdev_writeboost_drop_caches", wb_rpc_drop_caches, SPDK_RPC_RUNTIME)
SPDK_RPC_REGISTER("bdev_writeboost_clear_stats", wb_rpc_clear_stats, SPDK_RPC_RUNTIME)
SPDK_RPC_REGISTER("bdev_writeboost_get_quarantine", wb_rpc_get_quarantine, SPDK_RPC_RUNTIME)
SPDK_RPC_REGISTER("bdev_writeboost_drop_quarantine", wb_rpc_drop_quarantine, SPDK_RPC_RUNTIME)

SPDK_LOG_REGISTER_COMPONENT(bdev_writeboost)
