//! NBD wire protocol (fixed newstyle handshake, simple replies), as pure
//! parsing and encoding functions plus a handshake driver generic over
//! `Read + Write`. Nothing here panics on any input.

use std::io::{self, Read, Write};

use thiserror::Error;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CFLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CFLAG_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Flags this server advertises.
pub const TRANSMISSION_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_CAN_MULTI_CONN;

// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

// Errors (NBD numbering).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ESHUTDOWN: u32 = 108;

/// The block size every client may assume without negotiating it (the
/// spec's interoperable minimum); larger ones must be negotiated.
pub const DEFAULT_BLOCK: u32 = 512;
/// The preferred block size advertised unless the minimum is larger: one
/// cache line of the engine.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest request payload accepted.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload read during the handshake.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Options a client may send before it must pick an export.
pub const MAX_OPTIONS: usize = 256;

pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;

/// The export served.
#[derive(Clone, Debug)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub flags: u16,
    /// The device's block size (512 or 4096): requests must be aligned to
    /// it, and it is advertised as the minimum block size.
    pub block_size: u32,
}

impl Export {
    /// True if `name` selects this export (the empty name is the default export).
    pub fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }
}

#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("connection failed during the handshake: {0}")]
    Io(#[from] io::Error),
    #[error("client sent a bad option magic {0:#x}; it does not speak fixed newstyle NBD")]
    BadOptionMagic(u64),
    #[error("client sent unknown client flags {0:#x}")]
    BadClientFlags(u32),
    #[error(
        "client sent an export name of {0} bytes (limit {MAX_OPTION_LEN}); export names are at most 4096 bytes"
    )]
    OptionTooLong(u32),
    #[error("client asked for unknown export {0:?}")]
    UnknownExport(String),
    #[error("client sent more than {MAX_OPTIONS} options")]
    TooManyOptions,
}

/// How the handshake ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Negotiated {
    /// Transmission phase starts.
    Transmission,
    /// The client aborted (or listed exports and left).
    Aborted,
}

/// The server's greeting.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// Checks the client flags; returns whether the client wants no zero padding.
pub fn parse_client_flags(flags: u32) -> Result<bool, HandshakeError> {
    if flags & !(CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES) != 0 {
        return Err(HandshakeError::BadClientFlags(flags));
    }
    Ok(flags & CFLAG_NO_ZEROES != 0)
}

/// (option, length) from a 16-byte option header.
pub fn parse_option_header(b: &[u8; 16]) -> Result<(u32, u32), HandshakeError> {
    let magic = be64(&b[0..8]);
    if magic != IHAVEOPT {
        return Err(HandshakeError::BadOptionMagic(magic));
    }
    Ok((be32(&b[8..12]), be32(&b[12..16])))
}

/// An option reply.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&REPLY_MAGIC_OPT.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Body of NBD_OPT_INFO / NBD_OPT_GO: export name and requested info types.
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a [u8],
    pub infos: Vec<u16>,
}

/// Parses an INFO/GO body; None if its lengths are inconsistent.
pub fn parse_info_request(d: &[u8]) -> Option<InfoRequest<'_>> {
    let name_len = be32(d.get(0..4)?) as usize;
    let name = d.get(4..4usize.checked_add(name_len)?)?;
    let rest = &d[4 + name_len..];
    let n = be16(rest.get(0..2)?) as usize;
    let list = &rest[2..];
    if list.len() != n * 2 {
        return None;
    }
    let infos = list.chunks_exact(2).map(be16).collect();
    Some(InfoRequest { name, infos })
}

/// NBD_REP_INFO payloads for an export.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// NBD_INFO_BLOCK_SIZE for an export with `block_size`-byte blocks: that
/// minimum, a preferred size of at least one engine cache line, and the
/// largest payload accepted.
pub fn info_block_size(block_size: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    v.extend_from_slice(&block_size.to_be_bytes());
    v.extend_from_slice(&block_size.max(PREFERRED_BLOCK).to_be_bytes());
    v.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
    v
}

fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + s.len());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}

/// Reply to NBD_OPT_EXPORT_NAME.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(134);
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        v.extend_from_slice(&[0u8; 124]);
    }
    v
}

/// Runs the fixed-newstyle handshake on `s` for `export`.
pub fn negotiate<S: Read + Write>(
    s: &mut S,
    export: &Export,
) -> Result<Negotiated, HandshakeError> {
    s.write_all(&greeting())?;
    s.flush()?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    let no_zeroes = parse_client_flags(u32::from_be_bytes(cf))?;
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let (opt, len) = parse_option_header(&h)?;
        if len > MAX_OPTION_LEN {
            if opt == OPT_EXPORT_NAME {
                // No error reply exists for this option: close.
                return Err(HandshakeError::OptionTooLong(len));
            }
            // Skip the data without holding it, say it was too big and let
            // the client go on haggling.
            let skipped = io::copy(&mut Read::by_ref(s).take(u64::from(len)), &mut io::sink())?;
            if skipped < u64::from(len) {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            s.write_all(&option_reply(
                opt,
                REP_ERR_TOO_BIG,
                format!("option data is limited to {MAX_OPTION_LEN} bytes").as_bytes(),
            ))?;
            s.flush()?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                if !export.matches(&data) {
                    // No error reply exists for this option: close.
                    return Err(HandshakeError::UnknownExport(
                        String::from_utf8_lossy(&data).into_owned(),
                    ));
                }
                s.write_all(&export_name_reply(export.size, export.flags, no_zeroes))?;
                s.flush()?;
                return Ok(Negotiated::Transmission);
            }
            OPT_ABORT => {
                // The client may already have closed; ignore failures.
                let _ = s.write_all(&option_reply(opt, REP_ACK, &[]));
                let _ = s.flush();
                return Ok(Negotiated::Aborted);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    s.write_all(&option_reply(
                        opt,
                        REP_ERR_INVALID,
                        b"NBD_OPT_LIST takes no data",
                    ))?;
                } else {
                    let mut d = Vec::new();
                    d.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(export.name.as_bytes());
                    s.write_all(&option_reply(opt, REP_SERVER, &d))?;
                    s.write_all(&option_reply(opt, REP_ACK, &[]))?;
                }
            }
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                None => s.write_all(&option_reply(
                    opt,
                    REP_ERR_INVALID,
                    b"malformed NBD_OPT_INFO/GO request",
                ))?,
                Some(req) if !export.matches(req.name) => {
                    let msg = format!("unknown export; this server serves {:?}", export.name);
                    s.write_all(&option_reply(opt, REP_ERR_UNKNOWN, msg.as_bytes()))?
                }
                // Blocks larger than the interoperable 512 bytes: a client
                // entering transmission must have asked for the block sizes,
                // so that it knows to align (the spec's BLOCK_SIZE_REQD).
                Some(req)
                    if opt == OPT_GO
                        && export.block_size > DEFAULT_BLOCK
                        && !req.infos.contains(&INFO_BLOCK_SIZE) =>
                {
                    let msg = format!(
                        "export {:?} has {}-byte blocks; request NBD_INFO_BLOCK_SIZE and \
                         align every request to it",
                        export.name, export.block_size
                    );
                    s.write_all(&option_reply(opt, REP_ERR_BLOCK_SIZE_REQD, msg.as_bytes()))?
                }
                Some(req) => {
                    s.write_all(&option_reply(
                        opt,
                        REP_INFO,
                        &info_export(export.size, export.flags),
                    ))?;
                    // Sent whether asked for or not (the spec allows it).
                    let sizes = info_block_size(export.block_size);
                    s.write_all(&option_reply(opt, REP_INFO, &sizes))?;
                    if req.infos.contains(&INFO_NAME) {
                        let d = info_string(INFO_NAME, &export.name);
                        s.write_all(&option_reply(opt, REP_INFO, &d))?;
                    }
                    if req.infos.contains(&INFO_DESCRIPTION) {
                        let d = info_string(INFO_DESCRIPTION, &export.description);
                        s.write_all(&option_reply(opt, REP_INFO, &d))?;
                    }
                    s.write_all(&option_reply(opt, REP_ACK, &[]))?;
                    if opt == OPT_GO {
                        s.flush()?;
                        return Ok(Negotiated::Transmission);
                    }
                }
            },
            _ => s.write_all(&option_reply(opt, REP_ERR_UNSUP, b"option not supported"))?,
        }
        s.flush()?;
    }
    let _ = s.write_all(&option_reply(0, REP_ERR_TOO_BIG, b"too many options"));
    Err(HandshakeError::TooManyOptions)
}

/// A transmission-phase request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub cmd: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

/// Parses a 28-byte request header; None if the magic is wrong (the stream
/// cannot be resynchronised then: close it).
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Option<RequestHeader> {
    if be32(&b[0..4]) != REQUEST_MAGIC {
        return None;
    }
    Some(RequestHeader {
        flags: be16(&b[4..6]),
        cmd: be16(&b[6..8]),
        handle: be64(&b[8..16]),
        offset: be64(&b[16..24]),
        len: be32(&b[24..28]),
    })
}

/// What a valid request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    WriteZeroes,
}

/// The verdict on a request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Valid: run it.
    Ok { cmd: Cmd, fua: bool },
    /// Reply with this error (after reading a write's payload).
    Error(u32),
    /// Cannot be answered safely (a write payload too large to skip): close.
    Close,
}

/// Validates a request against `export`: its size, and its block size,
/// which offsets and lengths must be multiples of (EINVAL otherwise, as the
/// spec allows once block sizes are advertised).
pub fn check_request(h: &RequestHeader, export: &Export) -> Check {
    let size = export.size;
    let cmd = match h.cmd {
        CMD_READ => Cmd::Read,
        CMD_WRITE => Cmd::Write,
        CMD_DISC => {
            return Check::Ok {
                cmd: Cmd::Disc,
                fua: false,
            };
        }
        CMD_FLUSH => Cmd::Flush,
        CMD_TRIM => Cmd::Trim,
        CMD_WRITE_ZEROES => Cmd::WriteZeroes,
        _ => return Check::Error(EINVAL),
    };
    if cmd == Cmd::Write && h.len > MAX_PAYLOAD {
        return Check::Close;
    }
    // FUA is valid on every command once advertised (clients are known to
    // set it on reads and flushes; it means nothing there). NO_HOLE only
    // applies to WRITE_ZEROES; every zero this server writes is allocated.
    let allowed = match cmd {
        Cmd::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => CMD_FLAG_FUA,
    };
    if h.flags & !allowed != 0 {
        return Check::Error(EINVAL);
    }
    let writes = matches!(cmd, Cmd::Write | Cmd::Trim | Cmd::WriteZeroes);
    let fua = writes && h.flags & CMD_FLAG_FUA != 0;
    if cmd == Cmd::Flush {
        return Check::Ok { cmd, fua: false };
    }
    if cmd == Cmd::Read && h.len > MAX_PAYLOAD {
        return Check::Error(EINVAL);
    }
    let len = h.len as u64;
    let block = u64::from(export.block_size.max(DEFAULT_BLOCK));
    if !h.offset.is_multiple_of(block) || !len.is_multiple_of(block) {
        return Check::Error(EINVAL);
    }
    // Past the end: ENOSPC for what writes data, EINVAL for reads and trims.
    match h.offset.checked_add(len) {
        Some(end) if end <= size => Check::Ok { cmd, fua },
        _ if matches!(cmd, Cmd::Read | Cmd::Trim) => Check::Error(EINVAL),
        _ => Check::Error(ENOSPC),
    }
}

/// A simple reply header (read data, if any, follows it).
pub fn simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

fn be16(b: &[u8]) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[..2]);
    u16::from_be_bytes(a)
}

fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// An in-memory connection: reads from `input`, collects writes.
    struct Duplex {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Duplex {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }

    impl Write for Duplex {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn export() -> Export {
        Export {
            name: "wb0".into(),
            description: "test".into(),
            size: 1 << 20,
            flags: TRANSMISSION_FLAGS,
            block_size: 512,
        }
    }

    /// An export of `size` bytes with `block_size`-byte blocks.
    fn sized(size: u64, block_size: u32) -> Export {
        Export {
            size,
            block_size,
            ..export()
        }
    }

    fn opt(o: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&o.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn go_body(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }

    fn run(input: Vec<u8>) -> (Result<Negotiated, HandshakeError>, Vec<u8>) {
        run_with(input, &export())
    }

    fn run_with(input: Vec<u8>, export: &Export) -> (Result<Negotiated, HandshakeError>, Vec<u8>) {
        let mut d = Duplex {
            input: Cursor::new(input),
            output: Vec::new(),
        };
        let r = negotiate(&mut d, export);
        (r, d.output)
    }

    /// Splits option replies after the 18-byte greeting into (option, type, data).
    fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        let mut p = &out[18..];
        while p.len() >= 20 {
            assert_eq!(be64(&p[0..8]), REPLY_MAGIC_OPT);
            let len = be32(&p[16..20]) as usize;
            v.push((be32(&p[8..12]), be32(&p[12..16]), p[20..20 + len].to_vec()));
            p = &p[20 + len..];
        }
        v
    }

    #[test]
    fn go_with_block_size_and_unknown_option() {
        let mut input = CFLAG_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        input.extend(opt(8, &[])); // STRUCTURED_REPLY: unsupported
        input.extend(opt(OPT_LIST, &[]));
        input.extend(opt(OPT_GO, &go_body("nope", &[])));
        input.extend(opt(OPT_GO, &go_body("wb0", &[INFO_BLOCK_SIZE, INFO_NAME])));
        let (r, out) = run(input);
        assert_eq!(r.unwrap(), Negotiated::Transmission);
        assert_eq!(&out[..18], &greeting());
        let reps = replies(&out);
        assert_eq!(reps[0].1, REP_ERR_UNSUP);
        assert_eq!(reps[1].1, REP_SERVER);
        assert_eq!(&reps[1].2[4..], b"wb0");
        assert_eq!(reps[2].1, REP_ACK);
        assert_eq!(reps[3].1, REP_ERR_UNKNOWN);
        let info: Vec<_> = reps[4..].iter().collect();
        assert_eq!(info[0].1, REP_INFO);
        assert_eq!(info[0].2, info_export(1 << 20, TRANSMISSION_FLAGS));
        assert_eq!(info[1].2, info_block_size(512));
        assert_eq!(info[2].2[..2], INFO_NAME.to_be_bytes());
        assert_eq!(info.last().unwrap().1, REP_ACK);
    }

    #[test]
    fn four_kib_blocks_are_advertised_and_must_be_negotiated() {
        let export = sized(1 << 20, 4096);
        let mut input = CFLAG_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        // INFO without asking for sizes still learns them.
        input.extend(opt(OPT_INFO, &go_body("wb0", &[])));
        // GO without asking for sizes is refused: the client would not align.
        input.extend(opt(OPT_GO, &go_body("wb0", &[])));
        input.extend(opt(OPT_GO, &go_body("wb0", &[INFO_BLOCK_SIZE])));
        let (r, out) = run_with(input, &export);
        assert_eq!(r.unwrap(), Negotiated::Transmission);
        let reps = replies(&out);
        let sizes = info_block_size(4096);
        assert_eq!(be32(&sizes[2..6]), 4096, "minimum");
        assert_eq!(be32(&sizes[6..10]), 4096, "preferred");
        assert_eq!(be32(&sizes[10..14]), MAX_PAYLOAD, "maximum");
        assert_eq!(reps[0].0, OPT_INFO);
        assert_eq!(reps[1].2, sizes);
        assert_eq!(reps[2].1, REP_ACK);
        assert_eq!(reps[3].0, OPT_GO);
        assert_eq!(reps[3].1, REP_ERR_BLOCK_SIZE_REQD);
        assert!(String::from_utf8_lossy(&reps[3].2).contains("4096-byte blocks"));
        assert_eq!(reps[5].2, sizes);
        assert_eq!(reps.last().unwrap().1, REP_ACK);
        // Requests must be aligned to 4096 bytes, offset and length.
        for (off, len) in [(1024, 1024), (0, 512), (512, 4096), (4096, 6144)] {
            assert_eq!(
                check_request(&req(CMD_READ, 0, off, len), &export),
                Check::Error(EINVAL),
                "{off}+{len}"
            );
            assert_eq!(
                check_request(&req(CMD_WRITE, 0, off, len), &export),
                Check::Error(EINVAL)
            );
        }
        assert_eq!(
            check_request(&req(CMD_READ, 0, 8192, 8192), &export),
            Check::Ok {
                cmd: Cmd::Read,
                fua: false
            }
        );
        // 512-byte exports need no negotiation: that is every client's default.
        let mut input = CFLAG_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        input.extend(opt(OPT_GO, &go_body("wb0", &[])));
        let (r, out) = run(input);
        assert_eq!(r.unwrap(), Negotiated::Transmission);
        assert_eq!(replies(&out)[1].2, info_block_size(512));
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        for (flags, extra) in [(CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES, 0), (0, 124)] {
            let mut input = flags.to_be_bytes().to_vec();
            input.extend(opt(OPT_EXPORT_NAME, b"wb0"));
            let (r, out) = run(input);
            assert_eq!(r.unwrap(), Negotiated::Transmission);
            assert_eq!(out.len(), 18 + 10 + extra);
            assert_eq!(be64(&out[18..26]), 1 << 20);
        }
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt(OPT_EXPORT_NAME, b"other"));
        assert!(matches!(
            run(input).0,
            Err(HandshakeError::UnknownExport(_))
        ));
    }

    #[test]
    fn abort_bad_magic_bad_flags_malformed_info() {
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt(OPT_ABORT, &[]));
        assert_eq!(run(input).0.unwrap(), Negotiated::Aborted);

        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend_from_slice(&[0xff; 16]);
        assert!(matches!(
            run(input).0,
            Err(HandshakeError::BadOptionMagic(_))
        ));

        assert!(matches!(
            run(0x80u32.to_be_bytes().to_vec()).0,
            Err(HandshakeError::BadClientFlags(_))
        ));

        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt(OPT_INFO, &[0, 0, 0, 9, b'a']));
        input.extend(opt(OPT_LIST, b"junk"));
        let (r, out) = run(input);
        assert!(matches!(r, Err(HandshakeError::Io(_))));
        let reps = replies(&out);
        assert_eq!(reps[0].1, REP_ERR_INVALID);
        assert_eq!(reps[1].1, REP_ERR_INVALID);

        // An export name too long to read closes (NBD_OPT_EXPORT_NAME has
        // no error reply); the length alone allocates nothing.
        let mut input = 1u32.to_be_bytes().to_vec();
        let mut h = IHAVEOPT.to_be_bytes().to_vec();
        h.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        h.extend_from_slice(&u32::MAX.to_be_bytes());
        input.extend(h);
        assert!(matches!(
            run(input).0,
            Err(HandshakeError::OptionTooLong(u32::MAX))
        ));
    }

    #[test]
    fn oversized_option_is_skipped_with_too_big() {
        let mut input = 1u32.to_be_bytes().to_vec();
        let mut big = go_body("wb0", &[]);
        big.resize(MAX_OPTION_LEN as usize + 1, 0xa5);
        input.extend(opt(OPT_GO, &big));
        input.extend(opt(OPT_GO, &go_body("wb0", &[])));
        let (r, out) = run(input);
        assert_eq!(r.unwrap(), Negotiated::Transmission);
        let reps = replies(&out);
        assert_eq!((reps[0].0, reps[0].1), (OPT_GO, REP_ERR_TOO_BIG));
        assert_eq!(reps[1].1, REP_INFO);
        assert_eq!(reps.last().unwrap().1, REP_ACK);

        // A huge length whose data never comes: the connection ends, having
        // allocated nothing for it.
        let mut input = 1u32.to_be_bytes().to_vec();
        let mut h = IHAVEOPT.to_be_bytes().to_vec();
        h.extend_from_slice(&OPT_INFO.to_be_bytes());
        h.extend_from_slice(&u32::MAX.to_be_bytes());
        input.extend(h);
        input.extend_from_slice(&[0u8; 100]);
        let (r, out) = run(input);
        assert!(
            matches!(r, Err(HandshakeError::Io(ref e)) if e.kind() == io::ErrorKind::UnexpectedEof)
        );
        assert!(replies(&out).is_empty());
    }

    fn req(cmd: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader {
            flags,
            cmd,
            handle: 7,
            offset,
            len,
        }
    }

    #[test]
    fn request_checks() {
        let size = 1 << 20;
        assert_eq!(
            check_request(&req(CMD_WRITE, CMD_FLAG_FUA, 0, 4096), &sized(size, 512)),
            Check::Ok {
                cmd: Cmd::Write,
                fua: true
            }
        );
        assert_eq!(
            check_request(&req(CMD_READ, 0, 1, 512), &sized(size, 512)),
            Check::Error(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_READ, 0, 0, 100), &sized(size, 512)),
            Check::Error(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_READ, 0, size, 512), &sized(size, 512)),
            Check::Error(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_WRITE, 0, size - 512, 1024), &sized(size, 512)),
            Check::Error(ENOSPC)
        );
        assert_eq!(
            check_request(&req(CMD_WRITE, 0, u64::MAX - 511, 1024), &sized(size, 512)),
            Check::Error(ENOSPC)
        );
        assert_eq!(
            check_request(&req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 512), &sized(size, 512)),
            Check::Close
        );
        assert_eq!(
            check_request(
                &req(CMD_READ, 0, 0, MAX_PAYLOAD + 512),
                &sized(u64::MAX, 512)
            ),
            Check::Error(EINVAL)
        );
        // FUA is accepted on every command, and only means something on writes.
        assert_eq!(
            check_request(&req(CMD_READ, CMD_FLAG_FUA, 0, 512), &sized(size, 512)),
            Check::Ok {
                cmd: Cmd::Read,
                fua: false
            }
        );
        assert_eq!(
            check_request(&req(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), &sized(size, 512)),
            Check::Ok {
                cmd: Cmd::Flush,
                fua: false
            }
        );
        assert_eq!(
            check_request(&req(CMD_TRIM, CMD_FLAG_FUA, 0, 4096), &sized(size, 512)),
            Check::Ok {
                cmd: Cmd::Trim,
                fua: true
            }
        );
        // NO_HOLE only on WRITE_ZEROES; unknown flags never.
        assert_eq!(
            check_request(
                &req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, 0, 4096),
                &sized(size, 512)
            ),
            Check::Ok {
                cmd: Cmd::WriteZeroes,
                fua: true
            }
        );
        assert_eq!(
            check_request(
                &req(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 4096),
                &sized(size, 512)
            ),
            Check::Error(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_READ, 1 << 2, 0, 512), &sized(size, 512)),
            Check::Error(EINVAL)
        );
        // Past the end: EINVAL for trims, ENOSPC for zeroes (they write).
        assert_eq!(
            check_request(&req(CMD_TRIM, 0, size - 512, 1024), &sized(size, 512)),
            Check::Error(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_WRITE_ZEROES, 0, size, 512), &sized(size, 512)),
            Check::Error(ENOSPC)
        );
        // Misaligned trims and zeroes are refused like reads and writes.
        assert_eq!(
            check_request(&req(CMD_TRIM, 0, 256, 512), &sized(size, 512)),
            Check::Error(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_WRITE_ZEROES, 0, 0, 100), &sized(size, 512)),
            Check::Error(EINVAL)
        );
        assert_eq!(
            check_request(&req(99, 0, 0, 512), &sized(size, 512)),
            Check::Error(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_FLUSH, 0, 0, 0), &sized(size, 512)),
            Check::Ok {
                cmd: Cmd::Flush,
                fua: false
            }
        );
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_TRIM.to_be_bytes());
        b[24..28].copy_from_slice(&4096u32.to_be_bytes());
        assert_eq!(
            parse_request(&b).unwrap(),
            req(CMD_TRIM, 0, 0, 4096).with_handle(0)
        );
        b[0] ^= 1;
        assert!(parse_request(&b).is_none());
    }

    impl RequestHeader {
        fn with_handle(mut self, h: u64) -> Self {
            self.handle = h;
            self
        }
    }

    /// Random garbage never panics the handshake or the request parser.
    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..2000 {
            let n = (next() % 300) as usize;
            let mut input: Vec<u8> = (0..n).map(|_| next() as u8).collect();
            if round % 2 == 0 && input.len() > 20 {
                // Valid prefix so the option parser sees garbage bodies.
                input[..4].copy_from_slice(&1u32.to_be_bytes());
                input[4..12].copy_from_slice(&IHAVEOPT.to_be_bytes());
                input[12..16].copy_from_slice(&[0, 0, 0, (next() % 10) as u8]);
                input[16..20].copy_from_slice(&((n as u32).saturating_sub(20)).to_be_bytes());
            }
            let _ = run(input.clone());
            let _ = parse_info_request(&input);
            if input.len() >= REQUEST_LEN {
                let mut b = [0u8; REQUEST_LEN];
                b.copy_from_slice(&input[..REQUEST_LEN]);
                b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
                let h = parse_request(&b).unwrap();
                let _ = check_request(&h, &sized(next(), next() as u32));
            }
        }
    }
}
