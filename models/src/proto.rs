//! The protobuf wire format at the byte level, as far as ONNX files need it, and IEEE half floats:
//! shared by [`crate::carve`], [`crate::quantize`] and [`crate::shapes`] (which read and rewrite models
//! in memory) and [`crate::convert`] (which writes them). Hand-written rather than generated: the
//! readers copy untouched fields byte for byte, and the writer must produce exactly the bytes Python's
//! `onnx` package does.

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
            0 => Field::Varint(varint(&mut self.0)?),
            1 | 5 => {
                take(&mut self.0, if tag & 7 == 1 { 8 } else { 4 })?;
                Field::Fixed
            }
            2 => {
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

// Field numbers of onnx.proto.
pub const MODEL_IR_VERSION: u64 = 1;
pub const MODEL_GRAPH: u64 = 7;
pub const MODEL_OPSET_IMPORT: u64 = 8;
pub const OPSET_DOMAIN: u64 = 1;
pub const OPSET_VERSION: u64 = 2;
pub const GRAPH_NODE: u64 = 1;
pub const GRAPH_NAME: u64 = 2;
pub const GRAPH_INITIALIZER: u64 = 5;
pub const GRAPH_INPUT: u64 = 11;
pub const GRAPH_OUTPUT: u64 = 12;
pub const GRAPH_VALUE_INFO: u64 = 13;
pub const NODE_INPUT: u64 = 1;
pub const NODE_OUTPUT: u64 = 2;
pub const NODE_NAME: u64 = 3;
pub const NODE_OP_TYPE: u64 = 4;
pub const NODE_ATTRIBUTE: u64 = 5;
pub const NODE_DOMAIN: u64 = 7;
pub const ATTR_NAME: u64 = 1;
pub const ATTR_I: u64 = 3;
pub const ATTR_G: u64 = 6;
pub const ATTR_INTS: u64 = 8;
pub const ATTR_GRAPHS: u64 = 11;
pub const ATTR_TYPE: u64 = 20;
pub const ATTR_TYPE_INT: u64 = 2;
pub const TENSOR_DIMS: u64 = 1;
pub const TENSOR_DATA_TYPE: u64 = 2;
pub const TENSOR_FLOAT_DATA: u64 = 4;
pub const TENSOR_INT32_DATA: u64 = 5;
pub const TENSOR_NAME: u64 = 8;
pub const TENSOR_RAW_DATA: u64 = 9;
pub const TENSOR_DATA_LOCATION: u64 = 14;
pub const VALUE_INFO_NAME: u64 = 1;
pub const VALUE_INFO_TYPE: u64 = 2;
pub const TYPE_TENSOR: u64 = 1;
pub const TENSOR_TYPE_SHAPE: u64 = 2;
pub const SHAPE_DIM: u64 = 1;
pub const DIM_PARAM: u64 = 2;
// TensorProto.DataType.
pub const FLOAT: u64 = 1;
pub const UINT8: u64 = 2;
pub const FLOAT16: u64 = 10;

/// Appends `v` as a varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends a length-delimited field.
pub fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Appends a varint field.
pub fn put_uint(out: &mut Vec<u8>, field: u64, v: u64) {
    put_varint(out, field << 3);
    put_varint(out, v);
}

/// f32 to IEEE half, rounding to nearest even (as numpy's `astype(float16)`).
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x007f_ffff;
    if exp == 0xff {
        // Infinity, or NaN with its payload's top bits (kept non-zero), as numpy does.
        let h = 0x7c00 | (man >> 13) as u16;
        return sign | if man != 0 && h == 0x7c00 { h + 1 } else { h };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        // Subnormal half: value = r * 2^-24, with the implicit bit made explicit.
        let m = man | 0x0080_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let mut r = m >> shift;
        let rem = m & ((1u32 << shift) - 1);
        if rem > half || (rem == half && r & 1 == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut h = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    // A carry out of the mantissa steps the exponent, up to infinity: what rounding should do.
    if rem > 0x1000 || (rem == 0x1000 && h & 1 == 1) {
        h += 1;
    }
    sign | h as u16
}

/// IEEE half to f32 (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x03ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: normalise the mantissa.
            let mut e: i32 = -14;
            let mut m = man;
            while m & 0x0400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | (((e + 127) as u32) << 23) | ((m & 0x03ff) << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_round_trips_every_value_nan_payloads_included() {
        for h in 0..=u16::MAX {
            assert_eq!(f32_to_f16(f16_to_f32(h)), h, "{h:#06x}");
        }
    }

    #[test]
    fn half_rounds_to_nearest_even() {
        // 1 + 2^-11 is halfway between 1 and the next half (1 + 2^-10): ties to the even one, 1.
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3c00);
        // 1 + 3 * 2^-11 is halfway between 1 + 2^-10 (odd) and 1 + 2^-9: ties up.
        assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        assert_eq!(f32_to_f16(65520.0), 0x7c00);
        assert_eq!(f32_to_f16(2f32.powi(-25)), 0);
        assert_eq!(f32_to_f16(2f32.powi(-25) * 1.5), 1);
    }
}
