//! NumPy `.npy` headers and payloads.
//!
//! Written by hand rather than through `ndarray-npy` because the converter must accept every dtype
//! variant of the real files (big endian, Fortran order, `<U`/`|S` strings), must check the header
//! against the bytes really present before allocating anything, and copies payloads as raw bytes
//! (bit-exact, NaN payloads included) instead of converting element by element.

use std::fmt;

const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// Headers of real files are ~128 bytes; numpy itself refuses headers over 10 kB without opt-in.
pub const MAX_HEADER_LEN: usize = 65_536;

/// The kind of a numpy element, as far as this tool supports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Float,
    Int,
    UInt,
    Bool,
    /// Fixed-width UCS-4 string (`<U8`): `size` counts bytes (4 per character).
    Unicode,
    /// Fixed-width byte string (`|S8`).
    Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dtype {
    pub kind: Kind,
    /// Bytes per element.
    pub size: usize,
    pub big_endian: bool,
}

impl Dtype {
    pub fn parse(descr: &str) -> Result<Dtype, String> {
        // Byte-wise: a hostile header may put any UTF-8 here (format 3.0 allows it).
        let bytes = descr.as_bytes();
        if bytes.len() < 2 || !descr.is_ascii() {
            return Err(format!("dtype {descr:?} is not a numpy type string"));
        }
        let (order, rest) = match bytes[0] {
            b'<' | b'>' | b'|' | b'=' => (bytes[0], &bytes[1..]),
            _ => (b'=', bytes),
        };
        let Some((&code, digits)) = rest.split_first() else {
            return Err(format!("dtype {descr:?} is not a numpy type string"));
        };
        if code == b'O' {
            return Err(format!(
                "dtype {descr:?} is a pickled object array; refusing to unpickle it"
            ));
        }
        let count: usize = std::str::from_utf8(digits)
            .ok()
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| format!("dtype {descr:?} is not supported (not a plain numeric or fixed-width string type)"))?;
        let (kind, size) = match code {
            b'f' if matches!(count, 2 | 4 | 8) => (Kind::Float, count),
            b'i' if matches!(count, 1 | 2 | 4 | 8) => (Kind::Int, count),
            b'u' if matches!(count, 1 | 2 | 4 | 8) => (Kind::UInt, count),
            b'b' if count == 1 => (Kind::Bool, 1),
            b'U' if count > 0 => (
                Kind::Unicode,
                count.checked_mul(4).ok_or("string width overflows")?,
            ),
            b'S' | b'a' if count > 0 => (Kind::Bytes, count),
            _ => return Err(format!("dtype {descr:?} is not supported")),
        };
        // `=` is the writer's native order; every machine numpy runs on in practice is little endian.
        Ok(Dtype {
            kind,
            size,
            big_endian: order == b'>' && size > 1,
        })
    }

    pub fn is_numeric(&self) -> bool {
        matches!(self.kind, Kind::Float | Kind::Int | Kind::UInt | Kind::Bool)
    }

    /// The numpy descr of the little-endian form this tool writes, e.g. `<f4`.
    pub fn little_endian_descr(&self) -> String {
        Dtype {
            big_endian: false,
            ..*self
        }
        .to_string()
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let order = if self.size == 1 || matches!(self.kind, Kind::Bytes) {
            '|'
        } else if self.big_endian {
            '>'
        } else {
            '<'
        };
        let (code, count) = match self.kind {
            Kind::Float => ('f', self.size),
            Kind::Int => ('i', self.size),
            Kind::UInt => ('u', self.size),
            Kind::Bool => ('b', 1),
            Kind::Unicode => ('U', self.size / 4),
            Kind::Bytes => ('S', self.size),
        };
        write!(f, "{order}{code}{count}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub dtype: Dtype,
    pub fortran_order: bool,
    pub shape: Vec<u64>,
    /// Offset of the payload from the start of the file.
    pub payload_offset: usize,
}

impl Header {
    pub fn element_count(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }

    /// Payload size the header promises, or None when it overflows.
    pub fn payload_len(&self) -> Option<u64> {
        self.element_count()?.checked_mul(self.dtype.size as u64)
    }

    /// Checks the header's promise against the file's real size.
    pub fn check_file_len(&self, file_len: u64) -> Result<(), String> {
        let want = self
            .payload_len()
            .ok_or_else(|| format!("shape {:?} overflows a 64-bit byte count", self.shape))?;
        let have = file_len.saturating_sub(self.payload_offset as u64);
        if want != have {
            return Err(format!(
                "header promises {want} payload bytes (shape {:?}, dtype {}) but the file holds {have}",
                self.shape, self.dtype
            ));
        }
        Ok(())
    }
}

/// How many leading bytes always suffice to parse a header of a sane file.
pub const HEADER_PROBE_LEN: usize = 4096;

/// How many leading bytes hold the whole header, read off the preamble (magic, version, length),
/// when `bytes` starts with one; capped at what a valid header can need.
pub fn header_end(bytes: &[u8]) -> Option<usize> {
    if bytes.len() < 12 || &bytes[..6] != MAGIC {
        return None;
    }
    let (start, len) = match bytes[6] {
        1 => (10, u16::from_le_bytes([bytes[8], bytes[9]]) as usize),
        2 | 3 => (
            12,
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
        ),
        _ => return None,
    };
    Some(start + len.min(MAX_HEADER_LEN))
}

/// Parses the header at the start of `bytes`. `bytes` may be just a prefix of the file.
pub fn parse_header(bytes: &[u8]) -> Result<Header, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (bad magic bytes)".into());
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (len_size, utf8) = match major {
        1 => (2, false),
        2 => (4, false),
        3 => (4, true),
        _ => return Err(format!("unsupported .npy format version {major}.{minor}")),
    };
    let start = 8 + len_size;
    if bytes.len() < start {
        return Err("truncated .npy header".into());
    }
    let header_len = if len_size == 2 {
        u16::from_le_bytes([bytes[8], bytes[9]]) as usize
    } else {
        u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize
    };
    if header_len > MAX_HEADER_LEN {
        return Err(format!(
            "header length {header_len} is absurd (limit {MAX_HEADER_LEN})"
        ));
    }
    let end = start + header_len;
    let raw = bytes.get(start..end).ok_or_else(|| {
        format!(
            "truncated .npy header: it declares {header_len} bytes, only {} present",
            bytes.len().saturating_sub(start)
        )
    })?;
    let text = if utf8 {
        std::str::from_utf8(raw).map_err(|_| "header is not valid UTF-8".to_string())?
    } else {
        if !raw.is_ascii() {
            return Err("header is not ASCII".into());
        }
        std::str::from_utf8(raw).map_err(|_| "header is not ASCII".to_string())?
    };
    let dict = parse_dict(text.trim_end_matches(['\n', ' ', '\0']))?;
    let descr = match dict.get("descr") {
        Some(Value::Str(s)) => s.clone(),
        Some(_) => {
            return Err("structured dtypes (descr is not a string) are not supported".into())
        }
        None => return Err("header has no 'descr'".into()),
    };
    let fortran_order = match dict.get("fortran_order") {
        Some(Value::Bool(b)) => *b,
        _ => return Err("header has no boolean 'fortran_order'".into()),
    };
    let shape = match dict.get("shape") {
        Some(Value::Tuple(t)) => t.clone(),
        _ => return Err("header has no tuple 'shape'".into()),
    };
    if dict.len() != 3 {
        return Err("header has keys other than descr, fortran_order and shape".into());
    }
    let dtype = Dtype::parse(&descr)?;
    let header = Header {
        dtype,
        fortran_order,
        shape,
        payload_offset: end,
    };
    if header.payload_len().is_none() {
        return Err(format!(
            "shape {:?} overflows a 64-bit byte count",
            header.shape
        ));
    }
    Ok(header)
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Str(String),
    Bool(bool),
    Tuple(Vec<u64>),
}

/// A parser for exactly the Python dict literal numpy writes; anything else is refused.
fn parse_dict(text: &str) -> Result<std::collections::BTreeMap<String, Value>, String> {
    let bad = || {
        format!(
            "header is not a valid numpy header dict: {:?}",
            truncate(text, 120)
        )
    };
    let mut p = Cursor {
        s: text.as_bytes(),
        i: 0,
    };
    let mut out = std::collections::BTreeMap::new();
    p.ws();
    if !p.eat(b'{') {
        return Err(bad());
    }
    loop {
        p.ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string().ok_or_else(bad)?;
        p.ws();
        if !p.eat(b':') {
            return Err(bad());
        }
        p.ws();
        let value = if let Some(s) = p.string() {
            Value::Str(s)
        } else if p.word("True") {
            Value::Bool(true)
        } else if p.word("False") {
            Value::Bool(false)
        } else if p.s.get(p.i) == Some(&b'[') {
            return Err(
                "structured dtypes (a list of fields in 'descr') are not supported; save each field as its own array"
                    .into(),
            );
        } else if p.eat(b'(') {
            let mut dims = Vec::new();
            loop {
                p.ws();
                if p.eat(b')') {
                    break;
                }
                dims.push(p.integer().ok_or_else(bad)?);
                p.ws();
                if !p.eat(b',') {
                    p.ws();
                    if !p.eat(b')') {
                        return Err(bad());
                    }
                    break;
                }
            }
            Value::Tuple(dims)
        } else {
            return Err(bad());
        };
        if out.insert(key, value).is_some() {
            return Err(bad());
        }
        p.ws();
        if !p.eat(b',') {
            p.ws();
            if !p.eat(b'}') {
                return Err(bad());
            }
            break;
        }
    }
    p.ws();
    if p.i != p.s.len() {
        return Err(bad());
    }
    Ok(out)
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn word(&mut self, w: &str) -> bool {
        if self.s[self.i..].starts_with(w.as_bytes()) {
            self.i += w.len();
            true
        } else {
            false
        }
    }
    fn string(&mut self) -> Option<String> {
        let quote = *self.s.get(self.i)?;
        if quote != b'\'' && quote != b'"' {
            return None;
        }
        let start = self.i + 1;
        let len = self.s[start..].iter().position(|&c| c == quote)?;
        self.i = start + len + 1;
        String::from_utf8(self.s[start..start + len].to_vec()).ok()
    }
    fn integer(&mut self) -> Option<u64> {
        let start = self.i;
        while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
            self.i += 1;
        }
        // Python 2 era files may write `36L`.
        let n = std::str::from_utf8(&self.s[start..self.i])
            .ok()?
            .parse()
            .ok();
        self.eat(b'L');
        n
    }
}

/// Returns the payload as little-endian, C-order bytes: the layout the outputs use.
/// `payload` must be exactly `header.payload_len()` bytes (checked by the caller).
pub fn to_little_endian_c(header: &Header, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len());
    append_little_endian_c(header, payload, &mut out);
    out
}

/// Whether the payload's bytes already are little-endian C order (no copy needed).
pub fn is_little_endian_c(header: &Header) -> bool {
    let swap = header.dtype.big_endian && header.dtype.is_numeric();
    !swap && !needs_transpose(header)
}

fn needs_transpose(header: &Header) -> bool {
    header.fortran_order && header.shape.iter().filter(|&&d| d > 1).count() > 1
}

/// The payload as little-endian C-order bytes: the payload itself when it already is (the usual
/// case, no copy), else its conversion written into `scratch`.
pub fn little_endian_c<'a>(
    header: &Header,
    payload: &'a [u8],
    scratch: &'a mut Vec<u8>,
) -> &'a [u8] {
    if is_little_endian_c(header) {
        return payload;
    }
    scratch.clear();
    append_little_endian_c(header, payload, scratch);
    scratch
}

/// Appends the payload, converted to little-endian C order, to `out`.
pub fn append_little_endian_c(header: &Header, payload: &[u8], out: &mut Vec<u8>) {
    let size = header.dtype.size;
    let swap = header.dtype.big_endian && header.dtype.is_numeric();
    if !needs_transpose(header) {
        let start = out.len();
        out.extend_from_slice(payload);
        if swap {
            for element in out[start..].chunks_exact_mut(size) {
                element.reverse();
            }
        }
        return;
    }
    // Fortran order: element (i0, .., ik) sits at i0 + d0 * (i1 + d1 * ...). Walk the output in C
    // order and pick each element from its Fortran offset.
    let shape: Vec<usize> = header.shape.iter().map(|&d| d as usize).collect();
    let mut fortran_strides = vec![0usize; shape.len()];
    let mut stride = 1usize;
    for (axis, &d) in shape.iter().enumerate() {
        fortran_strides[axis] = stride;
        stride *= d;
    }
    let count = stride;
    let mut index = vec![0usize; shape.len()];
    out.reserve(count * size);
    for _ in 0..count {
        let offset: usize = index
            .iter()
            .zip(&fortran_strides)
            .map(|(i, s)| i * s)
            .sum::<usize>()
            * size;
        let element = &payload[offset..offset + size];
        if swap {
            out.extend(element.iter().rev());
        } else {
            out.extend_from_slice(element);
        }
        for axis in (0..shape.len()).rev() {
            index[axis] += 1;
            if index[axis] < shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
}

/// Decodes fixed-width string elements (`<U`, `>U`, `|S`), dropping numpy's trailing NULs.
pub fn decode_strings(header: &Header, payload: &[u8]) -> Result<Vec<String>, String> {
    let size = header.dtype.size;
    let c_order = to_little_endian_c(header, payload);
    let mut out = Vec::with_capacity(c_order.len() / size.max(1));
    for element in c_order.chunks_exact(size) {
        let s = match header.dtype.kind {
            Kind::Unicode => {
                let mut s = String::with_capacity(size / 4);
                for unit in element.chunks_exact(4) {
                    let code = if header.dtype.big_endian {
                        u32::from_be_bytes([unit[0], unit[1], unit[2], unit[3]])
                    } else {
                        u32::from_le_bytes([unit[0], unit[1], unit[2], unit[3]])
                    };
                    s.push(char::from_u32(code).ok_or_else(|| {
                        format!("invalid code point {code:#x} in a unicode string")
                    })?);
                }
                s.truncate(s.trim_end_matches('\0').len());
                s
            }
            Kind::Bytes => {
                let end = element.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
                String::from_utf8(element[..end].to_vec())
                    .map_err(|_| "a byte string (|S) is not valid UTF-8".to_string())?
            }
            _ => return Err(format!("dtype {} is not a string type", header.dtype)),
        };
        out.push(s);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, fortran: bool, shape: &str, payload: &[u8]) -> Vec<u8> {
        let dict = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
            if fortran { "True" } else { "False" }
        );
        let mut header = dict.into_bytes();
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(b' ');
        }
        header.push(b'\n');
        let mut out = MAGIC.to_vec();
        out.extend([1, 0]);
        out.extend((header.len() as u16).to_le_bytes());
        out.extend(header);
        out.extend(payload);
        out
    }

    #[test]
    fn parses_a_numpy_header() {
        let file = npy("<f4", false, "(2, 3)", &[0; 24]);
        let h = parse_header(&file).unwrap();
        assert_eq!(h.shape, vec![2, 3]);
        assert_eq!(h.dtype.to_string(), "<f4");
        assert_eq!(h.payload_offset, file.len() - 24);
        assert_eq!(h.payload_offset % 64, 0);
        h.check_file_len(file.len() as u64).unwrap();
        assert!(h.check_file_len(file.len() as u64 - 1).is_err());
        assert!(h.check_file_len(file.len() as u64 + 1).is_err());
    }

    #[test]
    fn scalar_and_one_dimensional_shapes() {
        assert_eq!(
            parse_header(&npy("<i8", false, "()", &[0; 8]))
                .unwrap()
                .shape,
            Vec::<u64>::new()
        );
        assert_eq!(
            parse_header(&npy("<i8", false, "(5,)", &[0; 40]))
                .unwrap()
                .shape,
            vec![5]
        );
    }

    #[test]
    fn refuses_object_and_bad_headers() {
        assert!(parse_header(&npy("|O", false, "(2,)", &[0; 16]))
            .unwrap_err()
            .contains("pickled"));
        assert!(parse_header(b"NOTNUMPY..........")
            .unwrap_err()
            .contains("magic"));
        let mut v9 = npy("<f4", false, "(1,)", &[0; 4]);
        v9[6] = 9;
        assert!(parse_header(&v9).unwrap_err().contains("version"));
        assert!(parse_header(&npy("<f4", false, "[1]", &[0; 4])).is_err());
        let huge = npy("<f8", false, "(4294967296, 4294967296, 4294967296)", &[]);
        assert!(parse_header(&huge).is_err());
    }

    #[test]
    fn fortran_big_endian_becomes_little_endian_c() {
        // 2x3 array [[1,2,3],[4,5,6]] as >i2 in Fortran order: column-major 1,4,2,5,3,6.
        let values: [i16; 6] = [1, 4, 2, 5, 3, 6];
        let payload: Vec<u8> = values.iter().flat_map(|v| v.to_be_bytes()).collect();
        let file = npy(">i2", true, "(2, 3)", &payload);
        let h = parse_header(&file).unwrap();
        let out = to_little_endian_c(&h, &file[h.payload_offset..]);
        let got: Vec<i16> = out
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(got, vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn decodes_fixed_width_strings() {
        let mut payload = Vec::new();
        for s in ["train", "oracle"] {
            let mut units: Vec<u32> = s.chars().map(|c| c as u32).collect();
            units.resize(6, 0);
            payload.extend(units.iter().flat_map(|u| u.to_le_bytes()));
        }
        let file = npy("<U6", false, "(2,)", &payload);
        let h = parse_header(&file).unwrap();
        assert_eq!(
            decode_strings(&h, &file[h.payload_offset..]).unwrap(),
            vec!["train", "oracle"]
        );
        let file = npy("|S4", false, "(2,)", b"L2/3L4\0\0");
        let h = parse_header(&file).unwrap();
        assert_eq!(
            decode_strings(&h, &file[h.payload_offset..]).unwrap(),
            vec!["L2/3", "L4"]
        );
    }
}
