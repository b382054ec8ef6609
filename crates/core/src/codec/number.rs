//! Numbers and booleans, read from the text into an element type: the JSON grammar of a number
//! checked in the pass that finds its end ([`decimal`]), then its value by a fast path with a
//! proven error bound ([`f32_near`], Clinger's for f64) or, where that cannot decide, a
//! correctly rounded parser (Eisel-Lemire, `fast-float2`).

/// Why an element could not be read: the text is not a JSON number (a syntax error at that
/// byte), or it is not a value of the element type.
pub(super) enum Bad {
    Syntax(usize),
    Value,
}

/// Where no number starts: another JSON value (a string, `true`, `false`, `null`, an object) is
/// a value of the wrong type; any other byte breaks the grammar.
fn not_a_number(b: &[u8], i: usize) -> Bad {
    match b.get(i) {
        Some(b'"' | b't' | b'f' | b'n' | b'{') => Bad::Value,
        _ => Bad::Syntax(i),
    }
}

/// An element type of tensor data: reads one JSON value into itself.
pub(super) trait Element: Sized {
    /// Bytes per element in the tensor.
    const SIZE: usize;
    /// The value whose text starts at `b[i]`, and where its text ends.
    fn read(b: &[u8], i: usize) -> Result<(Self, usize), Bad>;
    /// Appends the value's little-endian bytes.
    fn put(self, out: &mut Vec<u8>);
}

/// A JSON number's parts, read in the pass that checks its grammar: `negative`, the decimal
/// significand `digits` (`None` past 19 digits), the power of ten it is scaled by, and whether
/// it was written as an integer (no fraction or exponent).
struct Decimal {
    end: usize,
    negative: bool,
    integer: bool,
    digits: Option<u64>,
    exponent: i64,
}

/// Reads the run of decimal digits at `i` into `m` (`m * 10^k + run`, wrapping), eight at a
/// time where eight are there; returns where the run ends and the new `m`.
#[inline(always)]
fn digits(b: &[u8], mut i: usize, mut m: u64) -> (usize, u64) {
    while let Some(chunk) = b.get(i..i + 8) {
        let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let Some(v) = eight_digits(word) else { break };
        m = m.wrapping_mul(100_000_000).wrapping_add(v);
        i += 8;
    }
    while let Some(d) = b.get(i).filter(|c| c.is_ascii_digit()) {
        m = m.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
        i += 1;
    }
    (i, m)
}

/// The value of eight ASCII digits read as a little-endian word (the first digit in the low
/// byte), or `None` unless all eight bytes are digits. Each byte less `'0'` must be 0..=9: a
/// byte below `'0'` borrows into its top bit, one above `'9'` carries into it when 0x46 is
/// added. Then pairs, quads and the two halves are combined by multiply-and-shift.
#[inline(always)]
fn eight_digits(word: u64) -> Option<u64> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let v = word.wrapping_sub(0x30 * ONES);
    if (v | word.wrapping_add(0x46 * ONES)) & (0x80 * ONES) != 0 {
        return None;
    }
    // Byte k holds digit k (most significant first). Pairs: 10 * even + odd, in each 16 bits.
    let v = (v.wrapping_mul(10) + (v >> 8)) & 0x00FF_00FF_00FF_00FF;
    // Quads: 100 * first pair + second, in each 32 bits.
    let v = (v.wrapping_mul(100) + (v >> 16)) & 0x0000_FFFF_0000_FFFF;
    // The whole: 10^4 * first quad + second.
    Some((v.wrapping_mul(10_000) + (v >> 32)) & 0xFFFF_FFFF)
}

/// Powers of ten that f64 holds exactly.
const EXACT_POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// 10^-k, each the f64 nearest it (one rounding).
const NEGATIVE_POW10: [f64; 23] = [
    1e0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12, 1e-13, 1e-14,
    1e-15, 1e-16, 1e-17, 1e-18, 1e-19, 1e-20, 1e-21, 1e-22,
];

/// Reads the JSON number at `i`: `Err(Syntax)` where the grammar breaks, `Err(Value)` where
/// another JSON value starts (see [`not_a_number`]).
#[inline(always)]
fn decimal(b: &[u8], mut i: usize) -> Result<Decimal, Bad> {
    let negative = b.get(i) == Some(&b'-');
    if negative {
        i += 1;
    }
    let mut m: u64 = 0;
    // Digits taken into `m` (past 19 it has wrapped, and the slow parser decides).
    let mut count = 0usize;
    let mut exponent: i64 = 0;
    let mut integer = true;
    let digit = |i: usize| b.get(i).filter(|c| c.is_ascii_digit()).map(|c| c - b'0');
    match digit(i) {
        Some(0) => i += 1,
        Some(_) => {
            let start = i;
            (i, m) = digits(b, i, m);
            count += i - start;
        }
        None if negative => return Err(Bad::Syntax(i)),
        None => return Err(not_a_number(b, i)),
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        let first = i;
        (i, m) = digits(b, i, m);
        if i == first {
            return Err(Bad::Syntax(i));
        }
        // Leading zeros of a fraction (0.0001) are not significant, but counting them only
        // sends a rare long number to the slow parser.
        count += i - first;
        exponent -= (i - first) as i64;
        integer = false;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        integer = false;
        i += 1;
        let sign = match b.get(i) {
            Some(b'-') => {
                i += 1;
                -1
            }
            Some(b'+') => {
                i += 1;
                1
            }
            _ => 1,
        };
        let first = i;
        let mut e: i64 = 0;
        while let Some(d) = digit(i) {
            e = (e * 10 + i64::from(d)).min(1 << 40);
            i += 1;
        }
        if i == first {
            return Err(Bad::Syntax(i));
        }
        exponent += sign * e;
    }
    Ok(Decimal {
        end: i,
        negative,
        integer,
        digits: (count <= 19).then_some(m),
        exponent,
    })
}

/// The f64 nearest to `d` when Clinger's fast path gives it exactly: the significand fits in 53
/// bits and the power of ten is exact (short numbers, as serializers of f32 write them).
#[inline(always)]
fn clinger(d: &Decimal) -> Option<f64> {
    let m = d.digits.filter(|&m| m <= 1 << 53)?;
    if !(-22..=22).contains(&d.exponent) {
        return None;
    }
    let p = EXACT_POW10[d.exponent.unsigned_abs() as usize];
    let v = if d.exponent < 0 {
        m as f64 / p
    } else {
        m as f64 * p
    };
    Some(if d.negative { -v } else { v })
}

/// The f32 nearest to `d` when its significand fits in a u64 (at most 19 digits: f32s written
/// short, `0.19`, and widened to f64, `0.19000005722045898`, as numpy's `tolist()` gives them)
/// and its power of ten is at most 22. At most three roundings make the f64 `wide`: the
/// significand's conversion, 10^-k (10^k is exact) and the product; each is within half an ulp,
/// so `wide` is within three f64 ulps of the number. It rounds to the same f32 as the number
/// unless one of f32's halfway points (an f64 whose 29 bits below f32's 24 are a one and 28
/// zeros) lies that close: then `None` leaves it to the full parser (about one number in 10^8).
/// Values here lie in 1e-22..2e41, where f32 is normal, or overflows at a threshold that is a
/// halfway point too.
#[inline(always)]
fn f32_near(d: &Decimal) -> Option<f32> {
    const HALF: u64 = 0x1000_0000;
    let m = d.digits?;
    if !(-22..=22).contains(&d.exponent) {
        return None;
    }
    // A signed conversion is one instruction; the unsigned one (past 2^63) several.
    let wide = if m >> 63 == 0 {
        m as i64 as f64
    } else {
        m as f64
    };
    let k = d.exponent.unsigned_abs() as usize;
    let wide = if d.exponent < 0 {
        wide * NEGATIVE_POW10[k]
    } else {
        wide * EXACT_POW10[k]
    };
    if (wide.to_bits() & 0x1FFF_FFFF).abs_diff(HALF) <= 3 {
        return None;
    }
    let v = wide as f32;
    Some(if d.negative { -v } else { v })
}

/// The JSON number at `i` as the f64 nearest to it, and its end: by [`clinger`], else by
/// fast-float2 (Eisel-Lemire).
#[inline(always)]
fn float64(b: &[u8], i: usize) -> Result<(f64, usize), Bad> {
    let d = match decimal(b, i) {
        Ok(d) => d,
        Err(e) => return non_finite(b, i).ok_or(e),
    };
    match clinger(&d) {
        Some(v) => Ok((v, d.end)),
        None => Ok((
            fast_float2::parse(&b[i..d.end]).map_err(|_| Bad::Value)?,
            d.end,
        )),
    }
}

/// `NaN`, `Infinity` or `-Infinity` at `i`, as Triton and Python's `json` write non-finite
/// floats (not JSON, but what float clients send); read only where a float is expected.
#[cold]
fn non_finite(b: &[u8], i: usize) -> Option<(f64, usize)> {
    let rest = &b[i..];
    [
        (&b"NaN"[..], f64::NAN),
        (b"Infinity", f64::INFINITY),
        (b"-Infinity", f64::NEG_INFINITY),
    ]
    .into_iter()
    .find(|(word, _)| rest.starts_with(word))
    .map(|(word, v)| (v, i + word.len()))
}

/// Whether the float at `i` was written as one of [`non_finite`]'s words.
fn is_word(b: &[u8], i: usize) -> bool {
    matches!(b.get(i), Some(b'N' | b'I')) || b[i..].starts_with(b"-I")
}

/// A float read, or `Value` when it is out of its type's range (a finite number written too
/// large; the words for infinity are read as such, see [`non_finite`]).
#[inline(always)]
fn finite<T>(v: T, ok: bool, end: usize) -> Result<(T, usize), Bad> {
    if ok {
        Ok((v, end))
    } else {
        Err(Bad::Value)
    }
}

/// [`Element::put`] for a number type: its little-endian bytes.
macro_rules! put_le_bytes {
    () => {
        #[inline(always)]
        fn put(self, out: &mut Vec<u8>) {
            out.extend_from_slice(&self.to_le_bytes());
        }
    };
}

impl Element for f32 {
    const SIZE: usize = 4;
    #[inline(always)]
    fn read(b: &[u8], i: usize) -> Result<(Self, usize), Bad> {
        let d = match decimal(b, i) {
            Ok(d) => d,
            Err(e) => return non_finite(b, i).map(|(v, end)| (v as f32, end)).ok_or(e),
        };
        let end = d.end;
        let v = match f32_near(&d) {
            Some(v) => v,
            None => fast_float2::parse::<f32, _>(&b[i..end]).map_err(|_| Bad::Value)?,
        };
        finite(v, v.is_finite(), end)
    }
    put_le_bytes!();
}

impl Element for f64 {
    const SIZE: usize = 8;
    #[inline(always)]
    fn read(b: &[u8], i: usize) -> Result<(Self, usize), Bad> {
        let (v, end) = float64(b, i)?;
        finite(v, v.is_finite() || is_word(b, i), end)
    }
    put_le_bytes!();
}

impl Element for half::f16 {
    const SIZE: usize = 2;
    fn read(b: &[u8], i: usize) -> Result<(Self, usize), Bad> {
        let (v, end) = float64(b, i)?;
        let v = half::f16::from_f64(v);
        finite(v, v.is_finite() || is_word(b, i), end)
    }
    put_le_bytes!();
}

/// `true` or `false`, as one byte.
pub(super) struct Bool(u8);

impl Element for Bool {
    const SIZE: usize = 1;
    fn read(b: &[u8], i: usize) -> Result<(Self, usize), Bad> {
        let rest = &b[i..];
        if rest.starts_with(b"true") {
            Ok((Bool(1), i + 4))
        } else if rest.starts_with(b"false") {
            Ok((Bool(0), i + 5))
        } else {
            // A number is a valid JSON value but not a boolean; anything else is shown too.
            decimal(b, i)?;
            Err(Bad::Value)
        }
    }
    fn put(self, out: &mut Vec<u8>) {
        out.push(self.0);
    }
}

macro_rules! integer {
    ($($t:ty),*) => {$(
        impl Element for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            #[inline(always)]
            fn read(b: &[u8], i: usize) -> Result<(Self, usize), Bad> {
                let d = decimal(b, i)?;
                if !d.integer {
                    return Err(Bad::Value);
                }
                // Past 19 digits only a few u64s fit: counted again, with overflow checked.
                let magnitude = match d.digits {
                    Some(m) => m,
                    None => b[i..d.end]
                        .iter()
                        .filter(|c| c.is_ascii_digit())
                        .try_fold(0u64, |m, &c| m.checked_mul(10)?.checked_add(u64::from(c - b'0')))
                        .ok_or(Bad::Value)?,
                };
                let wide = if d.negative {
                    -i128::from(magnitude)
                } else {
                    i128::from(magnitude)
                };
                <$t>::try_from(wide).map(|v| (v, d.end)).map_err(|_| Bad::Value)
            }
            put_le_bytes!();
        }
    )*};
}

integer!(u8, u16, u32, u64, i8, i16, i32, i64);
