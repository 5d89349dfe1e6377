//! Reading the fields of one message, with the offset of every failure.

use super::DecodeError;

pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pub(super) pos: usize,
}

pub(super) type Result<T> = std::result::Result<T, DecodeError>;

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(super) fn error(&self, at: usize, reason: impl Into<String>) -> DecodeError {
        DecodeError {
            reason: reason.into(),
            offset: at,
        }
    }

    pub(super) fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let rest = &self.buf[self.pos..];
        if rest.len() < n {
            return Err(self.error(
                self.pos,
                format!("unexpected end of message reading {what}"),
            ));
        }
        self.pos += n;
        Ok(&rest[..n])
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let b = self.bytes(N, what)?;
        Ok(b.try_into().expect("N bytes"))
    }

    pub(super) fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(super) fn i16(&mut self, what: &str) -> Result<i16> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }

    pub(super) fn i32(&mut self, what: &str) -> Result<i32> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    pub(super) fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    pub(super) fn i64(&mut self, what: &str) -> Result<i64> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    pub(super) fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// A count (Int16 or Int32 on the wire) that must not be negative.
    pub(super) fn count(&mut self, wide: bool, what: &str) -> Result<usize> {
        let at = self.pos;
        let n = if wide {
            self.i32(what)?
        } else {
            i32::from(self.i16(what)?)
        };
        usize::try_from(n).map_err(|_| self.error(at, format!("negative {what} {n}")))
    }

    pub(super) fn utf8(&self, at: usize, bytes: &'a [u8], what: &str) -> Result<&'a str> {
        std::str::from_utf8(bytes).map_err(|_| self.error(at, format!("invalid UTF-8 in {what}")))
    }

    /// A NUL-terminated UTF-8 string.
    pub(super) fn cstr(&mut self, what: &str) -> Result<&'a str> {
        let at = self.pos;
        let rest = &self.buf[at..];
        let Some(len) = rest.iter().position(|&b| b == 0) else {
            return Err(self.error(at, format!("unterminated string reading {what}")));
        };
        self.pos += len + 1;
        self.utf8(at, &rest[..len], what)
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Fails unless every byte was read.
    pub(super) fn finish(&self) -> Result<()> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(self.error(self.pos, format!("{n} unexpected trailing bytes"))),
        }
    }
}
