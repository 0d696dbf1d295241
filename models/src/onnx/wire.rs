//! The protobuf wire format at the byte level: the one reader ([`Fields`]) and the writer's
//! primitives (`put_*`). The rewrites read with [`Fields`] and copy a field they leave alone as the
//! bytes it came in (the iterator yields each field's whole encoding); the typed messages of
//! [`super::write`] and the rewrites' re-wrapped messages are written with the `put_*` functions.

/// The bytes are not a protobuf message of the expected shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed ONNX protobuf: {0}")]
pub struct Malformed(pub &'static str);

/// The payload of one field.
#[derive(Clone, Copy)]
pub enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    /// A fixed32 or fixed64 value (never needed, only skipped).
    Fixed,
}

/// The fields of one message: (field number, payload, the field's whole encoding). After an error
/// the iteration ends.
pub struct Fields<'a>(pub &'a [u8]);

/// Reads one varint from the front of `buf`.
///
/// # Errors
/// Truncated or longer than ten bytes.
pub fn varint(buf: &mut &[u8]) -> Result<u64, Malformed> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first().ok_or(Malformed("truncated varint"))?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(Malformed("varint too long"))
}

/// The values of a packed repeated varint field (`dims`, `ints`, `int32_data` as written by
/// protobuf 3 and some exporters).
///
/// # Errors
/// A value is truncated or too long.
pub fn packed_varints(mut packed: &[u8]) -> Result<Vec<u64>, Malformed> {
    let mut values = Vec::new();
    while !packed.is_empty() {
        values.push(varint(&mut packed)?);
    }
    Ok(values)
}

impl<'a> Fields<'a> {
    fn field(&mut self) -> Result<(u64, Field<'a>, &'a [u8]), Malformed> {
        let start = self.0;
        let tag = varint(&mut self.0)?;
        let take = |buf: &mut &'a [u8], n: usize| -> Result<&'a [u8], Malformed> {
            let bytes = buf.get(..n).ok_or(Malformed("truncated field"))?;
            *buf = &buf[n..];
            Ok(bytes)
        };
        let value = match tag & 7 {
            VARINT => Field::Varint(varint(&mut self.0)?),
            FIXED64 | FIXED32 => {
                take(&mut self.0, if tag & 7 == FIXED64 { 8 } else { 4 })?;
                Field::Fixed
            }
            LEN => {
                let n = usize::try_from(varint(&mut self.0)?).map_err(|_| Malformed("length"))?;
                Field::Bytes(take(&mut self.0, n)?)
            }
            _ => return Err(Malformed("unsupported wire type")),
        };
        Ok((tag >> 3, value, &start[..start.len() - self.0.len()]))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Field<'a>, &'a [u8]), Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let item = self.field();
        if item.is_err() {
            self.0 = &[];
        }
        Some(item)
    }
}

/// A string field's text (lossy: names in valid models are UTF-8).
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The values of the string fields number `field` of `msg`, in order.
///
/// # Errors
/// `msg` is malformed.
pub fn strings(msg: &[u8], field: u64) -> Result<Vec<String>, Malformed> {
    let mut out = Vec::new();
    for f in Fields(msg) {
        if let (n, Field::Bytes(b), _) = f?
            && n == field
        {
            out.push(text(b));
        }
    }
    Ok(out)
}

// Wire types.
const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LEN: u64 = 2;
const FIXED32: u64 = 5;

/// Appends `v` as a varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u64, wire: u64) {
    put_varint(out, field << 3 | wire);
}

/// Appends a varint field (`int64`, `int32`, an enum). A negative value is written as its 64-bit
/// two's complement, ten bytes, as protobuf does.
pub fn put_int(out: &mut Vec<u8>, field: u64, v: i64) {
    put_key(out, field, VARINT);
    put_varint(out, v as u64);
}

/// Appends a `float` field.
pub fn put_f32(out: &mut Vec<u8>, field: u64, v: f32) {
    put_key(out, field, FIXED32);
    out.extend_from_slice(&v.to_le_bytes());
}

/// Appends a length-delimited field (a string, bytes, a packed list, an encoded message).
pub fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_len(out, field, bytes.len());
    out.extend_from_slice(bytes);
}

/// Appends the head of a length-delimited field whose `len` payload bytes the caller writes next (so
/// a large payload is written where it is, not copied into a message first).
pub fn put_len(out: &mut Vec<u8>, field: u64, len: usize) {
    put_key(out, field, LEN);
    put_varint(out, len as u64);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn negative_ints_take_ten_bytes() {
        let mut buf = Vec::new();
        put_int(&mut buf, 3, -1);
        assert_eq!(buf, [0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
    }

    #[test]
    fn what_is_written_reads_back() {
        let mut buf = Vec::new();
        put_int(&mut buf, 1, 300);
        put_f32(&mut buf, 2, 1.5);
        put_bytes(&mut buf, 3, b"abc");
        let fields: Vec<_> = Fields(&buf).map(Result::unwrap).collect();
        assert!(matches!(fields[0], (1, Field::Varint(300), [0x08, 0xac, 0x02])));
        assert!(matches!(fields[1], (2, Field::Fixed, [0x15, 0, 0, 0xc0, 0x3f])));
        assert!(matches!(fields[2], (3, Field::Bytes(b"abc"), [0x1a, 3, b'a', b'b', b'c'])));
        assert_eq!(strings(&buf, 3).unwrap(), ["abc"]);
        assert_eq!(packed_varints(&[0xac, 0x02, 0x01]).unwrap(), [300, 1]);
        assert!(Fields(&[0x1a, 5, b'a']).next().unwrap().is_err());
    }
}
