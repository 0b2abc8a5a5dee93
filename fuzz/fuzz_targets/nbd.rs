//! The NBD server's parsers must survive any client: the handshake driver
//! fed arbitrary bytes as the client's side of the stream, and request
//! headers checked against an export of arbitrary size.
#![no_main]
use std::io::{self, Read, Write};

use libfuzzer_sys::fuzz_target;
use writeboost_nbd::{Export, REQUEST_LEN, check_request, negotiate, parse_request};

/// A client that says `input` and swallows whatever the server answers.
struct Client<'a> {
    input: &'a [u8],
    answered: usize,
}

impl Read for Client<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Client<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.answered += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let size = data
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    let export = Export {
        name: "wb0".into(),
        description: "fuzz".into(),
        size,
        flags: 0,
        // Either block size the host serves, chosen by the input.
        block_size: if data.get(8).is_some_and(|b| b & 1 == 1) { 4096 } else { 512 },
    };
    let mut client = Client { input: data, answered: 0 };
    let _ = negotiate(&mut client, &export);
    for chunk in data.chunks_exact(REQUEST_LEN) {
        let header: &[u8; REQUEST_LEN] = chunk.try_into().expect("exact chunk");
        if let Some(h) = parse_request(header) {
            let _ = check_request(&h, &export);
        }
    }
});
