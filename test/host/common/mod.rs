//! Helpers for the host tests: start the real binary, run qemu-io, speak raw NBD.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

pub const START_TIMEOUT: Duration = Duration::from_secs(60);
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Server {
    pub child: Option<Child>,
    pub port: u16,
    pub stderr: mpsc::Receiver<String>,
}

/// Starts `writeboost` on `dir` on a free port; panics (with its stderr) if it
/// does not report serving in time.
pub fn start(dir: &Path, extra: &[&str]) -> Server {
    start_env(dir, extra, &[])
}

/// [`start`] with extra environment variables.
pub fn start_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_writeboost"))
        .envs(env.iter().copied())
        .arg("--data-dir")
        .arg(dir)
        .arg("--rpc-socket")
        .arg(dir.with_extension("rpc.sock"))
        .args([
            "--nbd-listen",
            "127.0.0.1:0",
            "--cache-size",
            "64M",
            "--backing-size",
            "256M",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start writeboost");
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (etx, erx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("[server] {line}");
            let _ = etx.send(line);
        }
    });
    let line = match rx.recv_timeout(START_TIMEOUT) {
        Ok(l) => l,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            let errs: Vec<String> = erx.try_iter().collect();
            panic!("writeboost did not start: {}", errs.join("\n"));
        }
    };
    let port = line
        .split("nbd://127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    Server {
        child: Some(child),
        port,
        stderr: erx,
    }
}

impl Server {
    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/wb0", self.port)
    }

    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().unwrap().id() as i32;
        // SAFETY: kill(2) on our own child's pid.
        let r = unsafe { libc::kill(pid, sig) };
        assert_eq!(r, 0, "kill failed");
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                panic!("writeboost did not exit within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and a clean exit with status 0.
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        let st = self.wait(Duration::from_secs(60));
        assert!(st.success(), "writeboost exited with {st:?} after SIGTERM");
    }

    /// Everything the (exited) server wrote to stderr.
    pub fn stderr_after_exit(&self) -> String {
        let mut lines = Vec::new();
        while let Ok(l) = self.stderr.recv_timeout(Duration::from_secs(10)) {
            lines.push(l);
        }
        lines.join("\n")
    }

    /// kill -9.
    pub fn crash(&mut self) {
        self.signal(libc::SIGKILL);
        self.wait(Duration::from_secs(10));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: {tool} is not installed (apt-get install qemu-utils / libnbd-bin)");
    }
    ok
}

/// Runs a command with a timeout; returns its stdout+stderr; panics on failure.
pub fn run_tool(cmd: &mut Command) -> String {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tool");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let to = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let te = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let end = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} timed out");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let text = format!("{}{}", to.join().unwrap(), te.join().unwrap());
    assert!(status.success(), "{cmd:?} failed ({status:?}):\n{text}");
    text
}

/// Runs qemu-io commands against `uri`; panics if any fails or a pattern mismatches.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = run_tool(&mut c);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("wb-host-test")
        .tempdir()
        .expect("tempdir")
}

pub fn path(d: &tempfile::TempDir) -> PathBuf {
    d.path().join("data")
}

/// A minimal NBD client (fixed newstyle, NBD_OPT_EXPORT_NAME, simple replies).
pub struct Client {
    pub s: TcpStream,
    pub size: u64,
}

pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;

impl Client {
    pub fn connect(port: u16) -> Client {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
        let mut o = b"IHAVEOPT".to_vec();
        o.extend_from_slice(&1u32.to_be_bytes());
        o.extend_from_slice(&3u32.to_be_bytes());
        o.extend_from_slice(b"wb0");
        s.write_all(&o).unwrap();
        let mut r = [0u8; 10];
        s.read_exact(&mut r).unwrap();
        let size = u64::from_be_bytes(r[..8].try_into().unwrap());
        Client { s, size }
    }

    pub fn send(&mut self, cmd: u16, flags: u16, handle: u64, offset: u64, len: u32, data: &[u8]) {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// Reads one simple reply; `read_len` is the payload expected if it succeeded.
    pub fn reply(&mut self, read_len: impl Fn(u64) -> usize) -> (u64, u32, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698);
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let handle = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut data = vec![0u8; if err == 0 { read_len(handle) } else { 0 }];
        self.s.read_exact(&mut data).unwrap();
        (handle, err, data)
    }
}

/// A host started with arbitrary arguments (a configuration file, an RPC
/// socket), and what it printed on stdout up to its "ready" line.
pub struct Host {
    pub server: Server,
    /// `serving NAME (...) on URLS` lines, by export name.
    pub serving: Vec<(String, String)>,
}

impl Host {
    /// The first NBD URL of an export.
    pub fn url(&self, name: &str) -> String {
        let line = &self
            .serving
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} is not exported: {:?}", self.serving))
            .1;
        line.split(" on ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .unwrap_or_else(|| panic!("no URL in {line:?}"))
            .to_string()
    }

    /// The TCP port of an export served over TCP.
    pub fn port(&self, name: &str) -> u16 {
        let url = self.url(name);
        url.trim_start_matches("nbd://")
            .split('/')
            .next()
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {url}"))
    }
}

/// Starts `writeboost ARGS`; panics (with its stderr) unless it reports ready.
pub fn start_host(args: &[&std::ffi::OsStr]) -> Host {
    let mut child = Command::new(env!("CARGO_BIN_EXE_writeboost"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start writeboost");
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (etx, erx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("[server] {line}");
            let _ = etx.send(line);
        }
    });
    let mut serving = Vec::new();
    loop {
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(l) if l.starts_with("writeboost: ready") => break,
            Ok(l) => {
                if let Some(rest) = l.strip_prefix("writeboost: serving ") {
                    let name = rest.split(' ').next().unwrap_or_default().to_string();
                    serving.push((name, l.clone()));
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let errs: Vec<String> = erx.try_iter().collect();
                panic!("writeboost did not start: {}", errs.join("\n"));
            }
        }
    }
    Host {
        server: Server {
            child: Some(child),
            port: 0,
            stderr: erx,
        },
        serving,
    }
}

/// A JSON-RPC 2.0 client on the host's Unix socket.
pub struct Rpc {
    s: std::os::unix::net::UnixStream,
    r: BufReader<std::os::unix::net::UnixStream>,
    id: u64,
}

impl Rpc {
    pub fn connect(path: &Path) -> Rpc {
        let s = std::os::unix::net::UnixStream::connect(path).expect("connect to the RPC socket");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        Rpc { s, r, id: 0 }
    }

    /// Sends raw bytes without waiting for an answer.
    pub fn send_only(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// Sends raw bytes and reads one response line.
    pub fn raw(&mut self, bytes: &[u8]) -> serde_json::Value {
        self.s.write_all(bytes).unwrap();
        let mut line = String::new();
        self.r.read_line(&mut line).expect("read a response");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad response {line:?}: {e}"))
    }

    /// The whole response of one call.
    pub fn response(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.id += 1;
        let mut req = serde_json::json!({"jsonrpc": "2.0", "id": self.id, "method": method});
        if !params.is_null() {
            req["params"] = params;
        }
        let v = self.raw(req.to_string().as_bytes());
        assert_eq!(v["id"], serde_json::json!(self.id), "{v}");
        v
    }

    /// The result of a call that must succeed.
    pub fn ok(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let v = self.response(method, params.clone());
        assert!(
            v.get("error").is_none(),
            "{method} {params} failed: {}",
            v["error"]
        );
        v["result"].clone()
    }

    /// The error (code, message) of a call that must fail.
    pub fn err(&mut self, method: &str, params: serde_json::Value) -> (i64, String) {
        let v = self.response(method, params.clone());
        let e = v
            .get("error")
            .unwrap_or_else(|| panic!("{method} {params} should have failed: {v}"));
        (
            e["code"].as_i64().unwrap(),
            e["message"].as_str().unwrap().to_string(),
        )
    }
}

impl Client {
    /// Connects to a named export over TCP.
    pub fn connect_export(port: u16, name: &str) -> Client {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut o = b"IHAVEOPT".to_vec();
        o.extend_from_slice(&1u32.to_be_bytes());
        o.extend_from_slice(&(name.len() as u32).to_be_bytes());
        o.extend_from_slice(name.as_bytes());
        s.write_all(&o).unwrap();
        let mut r = [0u8; 10];
        s.read_exact(&mut r).unwrap();
        let size = u64::from_be_bytes(r[..8].try_into().unwrap());
        Client { s, size }
    }
}
