"""writeboost JSON-RPC methods for SPDK's rpc.py.

    PYTHONPATH=/path/to/writeboost/rpc rpc.py --plugin writeboost_rpc \\
        bdev_writeboost_create -n wb0 -b Backing0 -c Cache0 --mode 1 --pmem-path /mnt/pmem/wb0

Parameter names follow SPDK's conventions (snake_case); the methods are
served by the SPDK bdev module and by the standalone host alike.
"""

import json

# Runtime tunables: (name, help). Ranges are checked by the server.
TUNABLES = [
    ("writeback_threshold", "background writeback runs while backing load %% is below this (0-100)"),
    ("writeback_delay_ms", "background writeback leaves a log this long after it is durable (0-3600000)"),
    ("nr_max_batched_writeback", "segments per writeback batch (1-32)"),
    ("update_sb_record_interval", "seconds between superblock record updates (0-3600)"),
    ("sync_data_interval", "seconds after which an idle partial buffer is logged (0-3600)"),
    ("read_cache_threshold", "stage missed reads unless a sequential run is longer (0 = off, 0-127)"),
    ("barrier_deadline_ms", "how long FUA/FLUSH waits for the buffer to fill (0-10000)"),
    ("write_around_mode", "1: writes go straight to the backing device"),
    ("bypass_write_kib", "writes of at least this many KiB bypass the log (0 = never)"),
    ("clean_max_live_pct", "copy a log's live dirty blocks forward when they fill at most this %% (0 = never, 0-90)"),
    ("max_relocations", "times a block is copied forward before it is written back instead (0-255)"),
    ("writeback_max_inflight", "writeback writes in flight on the backing device (1-1024)"),
    ("clean_min_writeback_us", "clean in the cache only while writeback costs at least this many us per block (0 = always)"),
]


def _print(result):
    print(json.dumps(result, indent=2))


def _tunables(args):
    return {name: getattr(args, name) for name, _ in TUNABLES if getattr(args, name) is not None}


def _add_tunables(p):
    for name, help_text in TUNABLES:
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, help=help_text)


def spdk_rpc_plugin_initialize(subparsers):
    def bdev_writeboost_create(args):
        params = {"name": args.name, "backing_bdev": args.backing_bdev, "cache_bdev": args.cache_bdev}
        if args.mode is not None:
            params["mode"] = args.mode
        if args.pmem_path:
            params["pmem_path"] = args.pmem_path
        if args.format:
            params["format"] = True
        if args.salvage:
            params["salvage"] = True
        if args.wait_for_bdevs:
            params["wait_for_bdevs"] = True
        if args.segment_size_kib is not None:
            params["segment_size_kib"] = args.segment_size_kib
        if args.core is not None:
            params["core"] = args.core
        if args.io_core is not None:
            params["io_core"] = args.io_core
        params.update(_tunables(args))
        _print(args.client.call("bdev_writeboost_create", params))

    p = subparsers.add_parser("bdev_writeboost_create", help="Create a writeboost bdev over a cache and a backing bdev")
    p.add_argument("-n", "--name", required=True, help="name of the writeboost bdev")
    p.add_argument("-b", "--backing-bdev", dest="backing_bdev", required=True, help="slow backing bdev")
    p.add_argument("-c", "--cache-bdev", dest="cache_bdev", required=True, help="fast cache bdev")
    p.add_argument("-m", "--mode", type=int, choices=[0, 1], help="0 = volatile RAM buffer (default), 1 = pmem buffer")
    p.add_argument("-p", "--pmem-path", dest="pmem_path", help="pmem pool (needed for mode 1)")
    p.add_argument("-f", "--format", action="store_true", help="reformat even if a valid cache is present")
    p.add_argument("--salvage", action="store_true",
                   help="open a cache whose device damaged logs it had made durable, keeping every intact log")
    p.add_argument("--segment-size-kib", dest="segment_size_kib", type=int, help="segment size when formatting (64-4096)")
    p.add_argument("--core", type=int, help="core whose thread runs the device's engine (default: round robin over the target's cores)")
    p.add_argument("--io-core", dest="io_core", type=int, help="core of a thread that starts and completes the device's base-bdev I/O (default: the device's own thread)")
    p.add_argument("-w", "--wait-for-bdevs", dest="wait_for_bdevs", action="store_true",
                   help="if a base bdev does not exist yet, create the device when it appears")
    _add_tunables(p)
    p.set_defaults(func=bdev_writeboost_create)

    def bdev_writeboost_delete(args):
        _print(args.client.call("bdev_writeboost_delete", {"name": args.name}))

    p = subparsers.add_parser("bdev_writeboost_delete", help="Detach a writeboost bdev cleanly")
    p.add_argument("name", help="writeboost bdev name")
    p.set_defaults(func=bdev_writeboost_delete)

    def bdev_writeboost_get_stats(args):
        params = {"name": args.name} if args.name else None
        _print(args.client.call("bdev_writeboost_get_stats", params))

    p = subparsers.add_parser("bdev_writeboost_get_stats", help="Counters, device traffic and status")
    p.add_argument("-n", "--name", help="only this writeboost bdev")
    p.set_defaults(func=bdev_writeboost_get_stats)

    def bdev_writeboost_set_options(args):
        params = {"name": args.name}
        params.update(_tunables(args))
        _print(args.client.call("bdev_writeboost_set_options", params))

    p = subparsers.add_parser("bdev_writeboost_set_options", help="Change tunables at runtime")
    p.add_argument("name", help="writeboost bdev name")
    _add_tunables(p)
    p.set_defaults(func=bdev_writeboost_set_options)

    for method, help_text in [
        ("bdev_writeboost_drop_caches", "Write back every dirty block (returns at once; watch get_stats)"),
        ("bdev_writeboost_clear_stats", "Reset the counters"),
    ]:
        def call(args, method=method):
            _print(args.client.call(method, {"name": args.name}))

        p = subparsers.add_parser(method, help=help_text)
        p.add_argument("name", help="writeboost bdev name")
        p.set_defaults(func=call)

    def bdev_writeboost_get_quarantine(args):
        _print(args.client.call("bdev_writeboost_get_quarantine", {"name": args.name}))

    p = subparsers.add_parser(
        "bdev_writeboost_get_quarantine",
        help="Blocks whose cached copy was found damaged: they read as errors until rewritten whole",
    )
    p.add_argument("name", help="writeboost bdev name")
    p.set_defaults(func=bdev_writeboost_get_quarantine)

    def bdev_writeboost_drop_quarantine(args):
        params = {"name": args.name, "block": args.block}
        _print(args.client.call("bdev_writeboost_drop_quarantine", params))

    p = subparsers.add_parser(
        "bdev_writeboost_drop_quarantine",
        help="Forget a quarantined block's damaged copy: it reads as the backing device's (older) data",
    )
    p.add_argument("name", help="writeboost bdev name")
    p.add_argument("block", type=int, help="4 KiB block number, as get_quarantine lists it")
    p.set_defaults(func=bdev_writeboost_drop_quarantine)

    # The standalone host's NBD export (spdk_tgt exports through nvmf or vhost instead).
    def nbd_server_start(args):
        params = {"bdev_name": args.bdev_name}
        if args.listen:
            params["listen"] = args.listen
        if args.socket:
            params["socket"] = args.socket
        _print(args.client.call("nbd_server_start", params))

    p = subparsers.add_parser("nbd_server_start", help="Standalone host: export a writeboost bdev over NBD")
    p.add_argument("bdev_name", help="writeboost bdev to export (the export name is the same)")
    p.add_argument("-l", "--listen", help="TCP address, e.g. 127.0.0.1:10809")
    p.add_argument("-s", "--socket", help="Unix socket path")
    p.set_defaults(func=nbd_server_start)

    def nbd_server_stop(args):
        _print(args.client.call("nbd_server_stop", {"bdev_name": args.bdev_name}))

    p = subparsers.add_parser("nbd_server_stop", help="Standalone host: stop accepting NBD clients for a bdev")
    p.add_argument("bdev_name", help="writeboost bdev whose export stops")
    p.set_defaults(func=nbd_server_stop)
