//! Message framing on a byte stream (TCP and TLS, RFC 8656 §3.1 and §12.5).
//!
//! Over a stream, STUN messages and ChannelData messages follow each other with no other
//! delimiter: a STUN message is its 20-byte header plus the header's length field (a multiple
//! of 4, RFC 8489 §5); a ChannelData message is its 4-byte header plus the length field,
//! padded to a multiple of 4 bytes: RFC 8656 §12.5: "over TCP and TLS-over-TCP, the
//! ChannelData message MUST be padded to a multiple of four bytes in order to ensure the
//! alignment of subsequent messages". The first two bits tell which: `00` STUN, `01`
//! ChannelData; anything else cannot start a message and ends the connection.
//!
//! [`next_frame`] looks at the front of a buffer and says how long the first message is,
//! without copying; the shell reads more bytes while it answers [`Frame::Incomplete`].

use crate::stun::{HEADER_LEN as STUN_HEADER_LEN, MAGIC_COOKIE};

/// What the front of a stream buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// Not enough bytes yet to know or to hold the first message; read more.
    Incomplete,
    /// A STUN message of this many bytes (header included).
    Stun(usize),
    /// A ChannelData message of this many bytes, header and padding included; the message
    /// to hand to the ChannelData decoder is the whole frame (it ignores up to 3 bytes of
    /// padding).
    ChannelData(usize),
}

/// Why the front of a stream buffer cannot be a message: the connection must be closed,
/// since there is no way to find the next message boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The first two bits are `10` or `11`: neither STUN nor ChannelData.
    NotTurn,
    /// A STUN header without the magic cookie (RFC 8489 §5), or with a length that is not a
    /// multiple of 4.
    BadStunHeader,
    /// The message would be longer than the configured maximum (bytes).
    TooLong(usize),
}

impl FrameError {
    /// A short name for logs and counters.
    pub fn as_str(self) -> &'static str {
        match self {
            FrameError::NotTurn => "not_turn",
            FrameError::BadStunHeader => "bad_stun_header",
            FrameError::TooLong(_) => "too_long",
        }
    }
}

/// Finds the first message at the front of `buf`, a stream's unconsumed bytes.
///
/// `max_frame` caps a message's length in bytes (header and padding included): a longer
/// one is refused as soon as its header is in, before its body is buffered.
///
/// # Errors
/// [`FrameError`] when the stream cannot carry TURN from here on.
pub fn next_frame(buf: &[u8], max_frame: usize) -> Result<Frame, FrameError> {
    let Some(&first) = buf.first() else {
        return Ok(Frame::Incomplete);
    };
    let (len, frame): (usize, fn(usize) -> Frame) = match first >> 6 {
        0b00 => {
            if buf.len() < 8 {
                // The cookie is checked as soon as it is in: a non-STUN peer is refused
                // before it can fill a buffer.
                return Ok(Frame::Incomplete);
            }
            if u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) != MAGIC_COOKIE {
                return Err(FrameError::BadStunHeader);
            }
            let body = u16::from_be_bytes([buf[2], buf[3]]) as usize;
            if body % 4 != 0 {
                return Err(FrameError::BadStunHeader);
            }
            (STUN_HEADER_LEN + body, Frame::Stun)
        }
        0b01 => {
            if buf.len() < 4 {
                return Ok(Frame::Incomplete);
            }
            let body = u16::from_be_bytes([buf[2], buf[3]]) as usize;
            (4 + body.div_ceil(4) * 4, Frame::ChannelData)
        }
        _ => return Err(FrameError::NotTurn),
    };
    if len > max_frame {
        return Err(FrameError::TooLong(len));
    }
    Ok(if buf.len() < len { Frame::Incomplete } else { frame(len) })
}

/// Bytes of padding that follow a ChannelData payload of `len` bytes on a stream (0-3).
pub fn channel_data_padding(len: usize) -> usize {
    (4 - len % 4) % 4
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 8192;

    fn stun(body: u16) -> Vec<u8> {
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&body.to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        m.extend_from_slice(&[7; 12]);
        m.extend(std::iter::repeat_n(0, body as usize));
        m
    }

    #[test]
    fn stun_message_is_header_plus_length() {
        let m = stun(8);
        assert_eq!(next_frame(&m, MAX), Ok(Frame::Stun(28)));
        for cut in 0..m.len() {
            assert_eq!(next_frame(&m[..cut], MAX), Ok(Frame::Incomplete), "cut {cut}");
        }
    }

    #[test]
    fn channel_data_frame_includes_padding() {
        // RFC 8656 §12.5: padded to a multiple of 4 over streams.
        let m = [0x40, 0x00, 0x00, 0x03, 1, 2, 3, 0, 0x40];
        assert_eq!(next_frame(&m, MAX), Ok(Frame::ChannelData(8)));
        assert_eq!(next_frame(&m[..7], MAX), Ok(Frame::Incomplete));
        let empty = [0x40, 0x01, 0x00, 0x00];
        assert_eq!(next_frame(&empty, MAX), Ok(Frame::ChannelData(4)));
    }

    #[test]
    fn garbage_and_bad_headers_are_refused() {
        assert_eq!(next_frame(&[0x80, 0, 0, 0], MAX), Err(FrameError::NotTurn));
        assert_eq!(next_frame(&[0xC0], MAX), Err(FrameError::NotTurn));
        let mut m = stun(4);
        m[4] = 0;
        assert_eq!(next_frame(&m, MAX), Err(FrameError::BadStunHeader));
        let mut m = stun(4);
        m[3] = 5;
        assert_eq!(next_frame(&m, MAX), Err(FrameError::BadStunHeader));
    }

    #[test]
    fn oversized_frames_are_refused_from_the_header() {
        // A length field of 65,535 is refused before the body is buffered.
        assert_eq!(
            next_frame(&[0x40, 0x00, 0xFF, 0xFF], MAX),
            Err(FrameError::TooLong(4 + 65536))
        );
        let m = stun(8192);
        assert_eq!(next_frame(&m[..8], MAX), Err(FrameError::TooLong(20 + 8192)));
        assert_eq!(next_frame(&m, 20 + 8192), Ok(Frame::Stun(20 + 8192)));
    }

    #[test]
    fn padding() {
        assert_eq!(
            (0..8).map(channel_data_padding).collect::<Vec<_>>(),
            [0, 3, 2, 1, 0, 3, 2, 1]
        );
    }
}
