//! JSON-RPC 2.0 over a Unix socket, as SPDK serves it: one JSON object per
//! request on a stream connection, answered in order; requests without an
//! `id` are notifications and get no answer. Malformed JSON is answered with
//! -32700 and ends that connection (the stream cannot be resynchronised);
//! the server itself keeps serving.

use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

use serde_json::{Value, json};
use thiserror::Error;
use writeboost_rpc::{RpcError, code};

use crate::registry::App;

/// Largest request accepted (a create with every tunable is well under 1 KiB).
const MAX_REQUEST: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum RpcSocketError {
    #[error(
        "another process serves RPC on {0}; stop it, or give this one its own socket with \
         -r/--rpc-socket PATH"
    )]
    InUse(PathBuf),
    #[error(
        "cannot listen on RPC socket {path}: {source}; check the directory and its permissions"
    )]
    Bind { path: PathBuf, source: io::Error },
}

/// Binds the RPC socket, replacing a stale one left by a process that died.
pub fn bind(path: &Path) -> Result<UnixListener, RpcSocketError> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        if UnixStream::connect(path).is_ok() {
            return Err(RpcSocketError::InUse(path.to_owned()));
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| {
        if source.kind() == io::ErrorKind::AddrInUse {
            RpcSocketError::InUse(path.to_owned())
        } else {
            RpcSocketError::Bind {
                path: path.to_owned(),
                source,
            }
        }
    })
}

/// Serves RPC connections until the process exits.
pub fn spawn(listener: UnixListener, app: Arc<App>) -> io::Result<()> {
    thread::Builder::new()
        .name("wb-rpc".into())
        .spawn(move || {
            for s in listener.incoming() {
                match s {
                    Ok(s) => {
                        let app = Arc::clone(&app);
                        let r = thread::Builder::new()
                            .name("wb-rpc-conn".into())
                            .spawn(move || serve(s, &app));
                        if let Err(e) = r {
                            eprintln!("writeboost: cannot start an RPC connection thread: {e}");
                        }
                    }
                    Err(e) => {
                        eprintln!("writeboost: RPC accept failed: {e}");
                        thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            }
        })?;
    Ok(())
}

fn error_response(id: Value, e: &RpcError) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": e.to_json()})
}

/// Answers one parsed request; `None` for a notification.
pub fn handle(app: &App, req: Value) -> Option<Value> {
    let Value::Object(mut m) = req else {
        return Some(error_response(
            Value::Null,
            &RpcError::new(
                code::INVALID_REQUEST,
                "Invalid request: expected a JSON object (batches are not supported)",
            ),
        ));
    };
    let id = m.remove("id");
    let reply_id = id.clone().unwrap_or(Value::Null);
    if !matches!(reply_id, Value::Null | Value::Number(_) | Value::String(_)) {
        return Some(error_response(
            Value::Null,
            &RpcError::new(
                code::INVALID_REQUEST,
                "Invalid request: 'id' must be a number or a string",
            ),
        ));
    }
    if m.get("jsonrpc") != Some(&json!("2.0")) {
        return Some(error_response(
            reply_id,
            &RpcError::new(
                code::INVALID_REQUEST,
                "Invalid request: 'jsonrpc' must be \"2.0\"",
            ),
        ));
    }
    let Some(Value::String(method)) = m.remove("method") else {
        return Some(error_response(
            reply_id,
            &RpcError::new(
                code::INVALID_REQUEST,
                "Invalid request: 'method' must be a string",
            ),
        ));
    };
    let params = m.remove("params");
    let result = app.call(&method, params.as_ref());
    id.as_ref()?;
    Some(match result {
        Ok(v) => json!({"jsonrpc": "2.0", "id": reply_id, "result": v}),
        Err(e) => error_response(reply_id, &e),
    })
}

fn serve(mut s: UnixStream, app: &App) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        let n = match s.read(&mut chunk) {
            Ok(0) => {
                if buf.iter().any(|b| !b.is_ascii_whitespace()) {
                    let e = RpcError::new(
                        code::PARSE_ERROR,
                        "Parse error: the connection ended inside a request",
                    );
                    let _ = write_value(&mut s, &error_response(Value::Null, &e));
                }
                return;
            }
            Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut consumed = 0;
        let mut fatal = None;
        {
            let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
            loop {
                match it.next() {
                    None => {
                        consumed = it.byte_offset();
                        break;
                    }
                    Some(Ok(v)) => {
                        consumed = it.byte_offset();
                        if let Some(resp) = handle(app, v)
                            && write_value(&mut s, &resp).is_err()
                        {
                            return;
                        }
                    }
                    Some(Err(e)) if e.is_eof() => break,
                    Some(Err(e)) => {
                        fatal = Some(format!("Parse error: {e}"));
                        break;
                    }
                }
            }
        }
        buf.drain(..consumed);
        if fatal.is_none() && buf.len() > MAX_REQUEST {
            fatal = Some(format!(
                "Parse error: request larger than {MAX_REQUEST} bytes"
            ));
        }
        if let Some(msg) = fatal {
            let _ = write_value(
                &mut s,
                &error_response(Value::Null, &RpcError::new(code::PARSE_ERROR, msg)),
            );
            return;
        }
    }
}

fn write_value(s: &mut UnixStream, v: &Value) -> io::Result<()> {
    let mut out = serde_json::to_vec(v).map_err(io::Error::other)?;
    out.push(b'\n');
    s.write_all(&out)
}
