//! WebSocket frames the hub writes: built once per publication and written, byte for byte,
//! to every subscriber's socket (RFC 6455 5.2). Server frames are never masked.

/// The largest header [`text_frame`] writes: opcode byte, length byte, 64-bit length.
pub const MAX_HEADER_BYTES: usize = 10;

/// Replaces `out` with one unfragmented, unmasked WebSocket text frame around `payload`.
///
/// The length takes the shortest of the three forms, as RFC 6455 requires: 7 bits below
/// 126, 16 bits below 65,536, 64 bits beyond. `payload` is sent as given: the caller
/// hands in UTF-8 (JSON).
pub fn text_frame(payload: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(payload.len() + MAX_HEADER_BYTES);
    out.push(0x81);
    let len = payload.len();
    if len < 126 {
        out.push(len as u8);
    } else if len < 1 << 16 {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The fields of a frame header, read back independently of the encoder.
    #[derive(Debug, PartialEq, Eq)]
    struct Header {
        fin: bool,
        rsv: u8,
        opcode: u8,
        masked: bool,
        len: u64,
        /// Header bytes: 2, 4 or 10 (no mask key on server frames).
        size: usize,
    }

    fn parse_header(frame: &[u8]) -> Header {
        let (b0, b1) = (frame[0], frame[1]);
        let (len, size) = match b1 & 0x7f {
            126 => (u64::from(u16::from_be_bytes([frame[2], frame[3]])), 4),
            127 => (u64::from_be_bytes(frame[2..10].try_into().unwrap()), 10),
            n => (u64::from(n), 2),
        };
        Header {
            fin: b0 & 0x80 != 0,
            rsv: (b0 >> 4) & 0x7,
            opcode: b0 & 0x0f,
            masked: b1 & 0x80 != 0,
            len,
            size,
        }
    }

    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        text_frame(payload, &mut out);
        out
    }

    /// The header size RFC 6455 requires for a payload of `len` bytes (the shortest form).
    fn minimal_header(len: usize) -> usize {
        match len {
            0..=125 => 2,
            126..=65_535 => 4,
            _ => 10,
        }
    }

    fn assert_round_trip(payload: &[u8]) {
        let frame = framed(payload);
        let h = parse_header(&frame);
        assert_eq!(
            h,
            Header {
                fin: true,
                rsv: 0,
                opcode: 1,
                masked: false,
                len: payload.len() as u64,
                size: minimal_header(payload.len()),
            }
        );
        assert_eq!(&frame[h.size..], payload);
    }

    #[test]
    fn header_forms_at_their_boundaries() {
        let cases: [(usize, &[u8]); 7] = [
            (0, &[0x81, 0]),
            (125, &[0x81, 125]),
            (126, &[0x81, 126, 0, 126]),
            (127, &[0x81, 126, 0, 127]),
            (65_535, &[0x81, 126, 0xff, 0xff]),
            (65_536, &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
            (70_000, &[0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]),
        ];
        for (len, header) in cases {
            let payload = vec![b'x'; len];
            let frame = framed(&payload);
            assert_eq!(&frame[..header.len()], header, "payload of {len} bytes");
            assert_eq!(frame.len(), header.len() + len);
            assert_round_trip(&payload);
        }
    }

    #[test]
    fn replaces_what_out_held() {
        let mut out = b"an older, longer frame".to_vec();
        text_frame(b"{}", &mut out);
        assert_eq!(out, [0x81, 2, b'{', b'}']);
    }

    /// Payload lengths near the boundaries of the three length forms, and anywhere.
    fn payload_len() -> impl Strategy<Value = usize> {
        prop_oneof![
            0usize..=2,
            123usize..=128,
            65_533usize..=65_538,
            0usize..70_000,
        ]
    }

    proptest! {
        #[test]
        fn round_trips(len in payload_len(), seed in any::<u8>()) {
            let payload: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
            assert_round_trip(&payload);
        }
    }
}
