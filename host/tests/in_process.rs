//! The host as a library: a registry and a reactor in this process, base
//! bdevs and a writeboost device created through the same RPC methods the
//! socket serves, and requests submitted straight to the device's queue.

use std::time::Duration;

use crossbeam_channel::{Receiver, unbounded};
use serde_json::{Value, json};
use writeboost_host::Build;
use writeboost_host::reactor::{IoBackendKind, ReactorHandle, ReactorOpts};
use writeboost_host::registry::{App, AppOpts};
use writeboost_host::request::{ConnMsg, ReqKind, Request, Shared};

const WAIT: Duration = Duration::from_secs(30);

fn app() -> App {
    let opts = ReactorOpts {
        backend: IoBackendKind::Threads,
        queue_depth: 64,
        io_threads: 2,
        spin: Duration::from_micros(10),
        idle_sleep: Duration::from_micros(100),
    };
    let reactor = ReactorHandle::spawn(0, None, opts).expect("reactor thread");
    let (stop_tx, _stop_rx) = unbounded();
    App::new(
        AppOpts {
            direct: false,
            verbose: false,
            build: Build {
                version: "0.0.0",
                git_rev: "test",
            },
        },
        vec![reactor],
        stop_tx,
    )
}

fn call(app: &App, method: &str, params: Value) -> Value {
    app.call(method, Some(&params))
        .unwrap_or_else(|e| panic!("{method}: {e:?}"))
}

/// Submits one request and waits for its reply: (errno, read data).
fn submit(
    q: &Shared,
    kind: ReqKind,
    offset: u64,
    len: u64,
    data: Vec<u8>,
    fua: bool,
) -> (u32, Vec<u8>) {
    let (tx, rx): (_, Receiver<ConnMsg>) = unbounded();
    q.submit(Request {
        kind,
        offset,
        len,
        data,
        fua,
        handle: 7,
        reply: tx,
        cost: 0,
    });
    match rx.recv_timeout(WAIT).expect("a reply") {
        ConnMsg::Reply {
            handle,
            error,
            data,
            ..
        } => {
            assert_eq!(handle, 7);
            (error, data)
        }
        ConnMsg::Close => panic!("closed instead of a reply"),
    }
}

#[test]
fn a_device_created_over_rpc_serves_requests_in_process() {
    let app = app();
    call(
        &app,
        "bdev_malloc_create",
        json!({"name": "Cache0", "num_blocks": 16384, "block_size": 4096}),
    );
    call(
        &app,
        "bdev_malloc_create",
        json!({"name": "Backing0", "num_blocks": 65536, "block_size": 4096}),
    );
    call(
        &app,
        "bdev_writeboost_create",
        json!({"name": "wb0", "backing_bdev": "Backing0", "cache_bdev": "Cache0"}),
    );
    let q = app.device_queue("wb0").expect("wb0 is online");
    assert!(app.device_queue("wb1").is_none());

    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        submit(&q, ReqKind::Write, 4096, 8192, data.clone(), true).0,
        0
    );
    let (err, back) = submit(&q, ReqKind::Read, 4096, 8192, Vec::new(), false);
    assert_eq!(err, 0);
    assert_eq!(back, data);
    // A misaligned request is refused, and nothing else changes.
    assert_ne!(submit(&q, ReqKind::Read, 100, 512, Vec::new(), false).0, 0);
    assert_eq!(submit(&q, ReqKind::Flush, 0, 0, Vec::new(), false).0, 0);

    let stats = call(&app, "bdev_writeboost_get_stats", json!({"name": "wb0"}));
    let text = stats.to_string();
    assert!(text.contains("\"user_write_cmds\":1"), "{text}");

    call(&app, "bdev_writeboost_delete", json!({"name": "wb0"}));
    assert!(app.device_queue("wb0").is_none());
    app.shutdown();
}
