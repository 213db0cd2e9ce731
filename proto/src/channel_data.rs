//! ChannelData framing (RFC 8656 §12.4).
//!
//! A ChannelData message is a 4-byte header (channel number, payload length, both
//! big-endian) followed by the payload. Over UDP the payload may be followed by up to 3
//! bytes of padding, which are ignored.

use std::fmt;

/// Size of the ChannelData header in bytes.
pub const HEADER_LEN: usize = 4;

/// The lowest channel number (RFC 8656 §12).
pub const MIN_CHANNEL: u16 = 0x4000;
/// The highest channel number RFC 8656 allows.
pub const MAX_CHANNEL_STRICT: u16 = 0x4FFF;
/// The highest channel number RFC 5766 allowed; deployed clients (coturn 4.6.1's uclient
/// among them) still pick from 0x4000-0x7FFF. Deviation (no MUST): RFC 8656 §12.6 says a
/// message in the reserved range 0x5000 through 0xFFFF is silently discarded; [`ChannelData::decode`]
/// accepts up to 0x7FFF, and such a message is relayed only on a channel that ChannelBind
/// accepted (not with `strict_channel_numbers`).
pub const MAX_CHANNEL_RFC5766: u16 = 0x7FFF;

/// A decoded ChannelData message borrowing its payload from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelData<'a> {
    /// Channel number, 0x4000-0x7FFF.
    pub channel: u16,
    /// The application data.
    pub payload: &'a [u8],
}

/// Why bytes are not a ChannelData message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelDataError {
    /// Shorter than the header, or than the header's length says.
    Truncated,
    /// The first two bits are not 0b01 (channel numbers 0x4000-0x7FFF).
    BadChannel,
    /// More than 3 bytes follow the payload.
    TrailingBytes,
}

impl fmt::Display for ChannelDataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChannelDataError::Truncated => "truncated ChannelData",
            ChannelDataError::BadChannel => "channel number outside 0x4000-0x7FFF",
            ChannelDataError::TrailingBytes => "bytes after the ChannelData payload beyond padding",
        })
    }
}

impl std::error::Error for ChannelDataError {}

/// Whether the first byte of a datagram marks ChannelData (0b01xxxxxx) rather than STUN
/// (0b00xxxxxx) (RFC 8656 §12).
pub fn is_channel_data(buf: &[u8]) -> bool {
    buf.first().is_some_and(|b| b & 0xC0 == 0x40)
}

impl<'a> ChannelData<'a> {
    /// Decodes a ChannelData datagram received over UDP.
    ///
    /// # Errors
    /// [`ChannelDataError`] when the header is short, the channel number is outside
    /// 0x4000-0x7FFF, the payload is shorter than announced, or more than 3 padding bytes follow.
    pub fn decode(buf: &'a [u8]) -> Result<Self, ChannelDataError> {
        if buf.len() < HEADER_LEN {
            return Err(ChannelDataError::Truncated);
        }
        let channel = u16::from_be_bytes([buf[0], buf[1]]);
        if !(MIN_CHANNEL..=MAX_CHANNEL_RFC5766).contains(&channel) {
            return Err(ChannelDataError::BadChannel);
        }
        let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        let end = HEADER_LEN + len;
        if buf.len() < end {
            return Err(ChannelDataError::Truncated);
        }
        if buf.len() - end > 3 {
            return Err(ChannelDataError::TrailingBytes);
        }
        Ok(ChannelData {
            channel,
            payload: &buf[HEADER_LEN..end],
        })
    }

    /// The 4-byte header for `payload_len` bytes on `channel`.
    pub fn header(channel: u16, payload_len: u16) -> [u8; HEADER_LEN] {
        let c = channel.to_be_bytes();
        let l = payload_len.to_be_bytes();
        [c[0], c[1], l[0], l[1]]
    }

    /// Appends the whole message (header and payload, no padding) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&Self::header(self.channel, self.payload.len() as u16));
        out.extend_from_slice(self.payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_with_and_without_padding() {
        let msg = [0x40, 0x01, 0x00, 0x03, 1, 2, 3];
        let cd = ChannelData::decode(&msg).unwrap();
        assert_eq!(cd.channel, 0x4001);
        assert_eq!(cd.payload, &[1, 2, 3]);
        let padded = [0x40, 0x01, 0x00, 0x03, 1, 2, 3, 0];
        assert_eq!(ChannelData::decode(&padded).unwrap().payload, &[1, 2, 3]);
        let too_much = [0x40, 0x01, 0x00, 0x00, 0, 0, 0, 0];
        assert_eq!(ChannelData::decode(&too_much), Err(ChannelDataError::TrailingBytes));
        assert_eq!(
            ChannelData::decode(&[0x40, 0x01, 0x00, 0x04, 1]),
            Err(ChannelDataError::Truncated)
        );
        assert_eq!(
            ChannelData::decode(&[0x80, 0x01, 0x00, 0x00]),
            Err(ChannelDataError::BadChannel)
        );
        assert_eq!(
            ChannelData::decode(&[0x40, 0x01, 0x00]),
            Err(ChannelDataError::Truncated)
        );
        assert!(is_channel_data(&[0x7f]) && !is_channel_data(&[0x00]) && !is_channel_data(&[0x80]));
    }

    proptest! {
        #[test]
        fn round_trip(channel in MIN_CHANNEL..=MAX_CHANNEL_RFC5766, payload in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let mut out = Vec::new();
            ChannelData { channel, payload: &payload }.encode(&mut out);
            let back = ChannelData::decode(&out).unwrap();
            prop_assert_eq!(back.channel, channel);
            prop_assert_eq!(back.payload, &payload[..]);
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = ChannelData::decode(&data);
        }
    }
}
