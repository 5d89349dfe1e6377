//! The WebSocket text frame encoder: the frame parses back (with tungstenite's parser) to a
//! final, unmasked text frame whose payload is the input, with the shortest length form,
//! and its header is byte for byte what tungstenite itself writes for that frame.
#![no_main]

use std::io::Cursor;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pyrt_engine::frame::{text_frame, MAX_HEADER_BYTES};
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

#[derive(Arbitrary, Debug)]
struct Input {
    /// What the output buffer held before (a previous frame): it must not leak through.
    previous: Vec<u8>,
    /// The payload's first bytes (the rest is `x`).
    body: Vec<u8>,
    /// The payload length: its two high bits pick a length next to the 16/64-bit boundary
    /// (65,530..65,541), any length up to 70,000 (every form) or up to 300 (the 7- and
    /// 16-bit forms, next to their boundary).
    len: u32,
}

fn payload_len(n: u32) -> usize {
    let low = (n & 0x3fff_ffff) as usize;
    match n >> 30 {
        0b11 | 0b10 => 65_530 + low % 12,
        0b01 => low % 70_000,
        _ => low % 300,
    }
}

fuzz_target!(|input: Input| {
    let len = payload_len(input.len);
    let mut payload = vec![b'x'; len];
    let body = input.body.len().min(len);
    payload[..body].copy_from_slice(&input.body[..body]);

    let mut out = input.previous;
    text_frame(&payload, &mut out);

    let text = FrameHeader {
        is_final: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode: OpCode::Data(Data::Text),
        mask: None,
    };
    let mut cursor = Cursor::new(&out[..]);
    let (header, length) = FrameHeader::parse(&mut cursor)
        .expect("a valid frame header")
        .expect("a complete frame header");
    assert_eq!(header, text);
    assert_eq!(length, len as u64);
    let header_size = cursor.position() as usize;
    assert!(header_size <= MAX_HEADER_BYTES);
    assert_eq!(&out[header_size..], &payload[..]);

    // The shortest length form, as RFC 6455 requires: what tungstenite writes.
    let mut expected = Vec::new();
    text.format(len as u64, &mut expected)
        .expect("writing to a Vec");
    assert_eq!(&out[..header_size], &expected[..]);
});
