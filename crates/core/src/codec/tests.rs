//! The codec's tests, through its front ([`Reader`]): numbers against the standard library's
//! parser, syntax and shape errors, counted rows, values passed over.

use proptest::prelude::*;

use crate::tensor::DataType;

use super::{JsonError, Reader};

fn flat(text: &str, dtype: DataType, count: usize) -> Result<Vec<u8>, JsonError> {
    let mut r = Reader::new(text.as_bytes(), "test");
    let data = r.tensor_data(dtype, &[count], "x")?;
    r.end()?;
    Ok(data)
}

/// What the standard library makes of one number, as `dtype`'s bytes; `None` where it is
/// not a value of the type (out of range, or not an integer for an integer type).
fn std_value(token: &str, dtype: DataType) -> Option<Vec<u8>> {
    macro_rules! int {
        ($t:ty) => {
            <$t>::try_from(token.parse::<i128>().ok()?)
                .ok()
                .map(|v| v.to_le_bytes().to_vec())
        };
    }
    match dtype {
        DataType::F32 => {
            let v = token.parse::<f32>().ok()?;
            v.is_finite().then(|| v.to_le_bytes().to_vec())
        }
        DataType::F64 => {
            let v = token.parse::<f64>().ok()?;
            v.is_finite().then(|| v.to_le_bytes().to_vec())
        }
        DataType::F16 => {
            let v = half::f16::from_f64(token.parse::<f64>().ok()?);
            v.is_finite().then(|| v.to_le_bytes().to_vec())
        }
        DataType::U8 => int!(u8),
        DataType::I8 => int!(i8),
        DataType::U16 => int!(u16),
        DataType::I16 => int!(i16),
        DataType::U32 => int!(u32),
        DataType::I32 => int!(i32),
        DataType::U64 => int!(u64),
        DataType::I64 => int!(i64),
        DataType::Bool => match token {
            "true" => Some(vec![1]),
            "false" => Some(vec![0]),
            _ => None,
        },
    }
}

/// JSON numbers of every form: integers of up to 25 digits, fractions with leading zeros,
/// exponents far past every type's range, and the shortest and 17-digit forms of random
/// f32 and f64 bit patterns.
fn json_number() -> impl Strategy<Value = String> {
    let digits = |n: std::ops::RangeInclusive<usize>| {
        proptest::collection::vec(0u8..10, n)
            .prop_map(|d| d.iter().map(|d| char::from(b'0' + d)).collect::<String>())
    };
    prop_oneof![
        (
            any::<bool>(),
            digits(1..=25),
            proptest::option::of(digits(1..=25)),
            proptest::option::of((any::<bool>(), 0i32..400))
        )
            .prop_map(|(neg, int, frac, exp)| {
                let int = int.trim_start_matches('0');
                let mut s = String::from(if neg { "-" } else { "" });
                s.push_str(if int.is_empty() { "0" } else { int });
                if let Some(f) = frac {
                    s.push('.');
                    s.push_str(&f);
                }
                if let Some((neg, e)) = exp {
                    s.push_str(if neg { "e-" } else { "E+" });
                    s.push_str(&e.to_string());
                }
                s
            }),
        any::<f32>()
            .prop_filter("finite", |v| v.is_finite())
            .prop_map(|v| serde_json::to_string(&v).unwrap()),
        // f32s widened to f64, as Python clients send them.
        any::<f32>()
            .prop_filter("finite", |v| v.is_finite())
            .prop_map(|v| serde_json::to_string(&f64::from(v)).unwrap()),
        (-1.0e6f32..1.0e6).prop_map(|v| serde_json::to_string(&f64::from(v)).unwrap()),
        any::<f64>()
            .prop_filter("finite", |v| v.is_finite())
            .prop_map(|v| serde_json::to_string(&v).unwrap()),
        any::<f64>()
            .prop_filter("finite", |v| v.is_finite())
            .prop_map(|v| format!("{v:.17e}")),
        any::<i64>().prop_map(|v| v.to_string()),
        any::<u64>().prop_map(|v| v.to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// Every number reads bit for bit as `str::parse` reads it, or is refused where that
    /// finds no value of the type.
    #[test]
    fn numbers_read_as_the_standard_library_reads_them(token in json_number()) {
        for dtype in DataType::ALL {
            let want = std_value(&token, dtype);
            let got = flat(&format!("[{token}]"), dtype, 1).ok();
            prop_assert_eq!(&got, &want, "{} as {}", token, dtype);
            // Alone and in the middle of others too.
            let got = flat(&format!("[0, {token} ,1]"), dtype, 3)
                .ok()
                .map(|b| b[dtype.size()..2 * dtype.size()].to_vec());
            if dtype != DataType::Bool {
                prop_assert_eq!(&got, &want, "{} as {} among others", token, dtype);
            }
        }
    }

    /// Text that is not a JSON array of numbers is never read as one: a valid array of
    /// numbers is read as its tokens parse one by one, anything else is refused. The texts
    /// are arrays with one character inserted, deleted or changed.
    #[test]
    fn only_json_arrays_of_numbers_are_read(
        values in proptest::collection::vec(json_number(), 1..6),
        edit in proptest::option::of((any::<prop::sample::Index>(), 0u8..3, prop::sample::select(
            b"0123456789-+.eE[]{},: \"tn".to_vec()))),
    ) {
        let mut text = format!("[{}]", values.join(", ")).into_bytes();
        if let Some((at, kind, c)) = edit {
            let i = at.index(text.len() + 1);
            match kind {
                0 => text.insert(i, c),
                1 if i < text.len() => { text.remove(i); }
                _ if i < text.len() => text[i] = c,
                _ => {}
            }
        }
        let text = String::from_utf8(text).unwrap();
        let tokens: Option<Vec<String>> = serde_json::from_str::<Vec<serde_json::Value>>(&text)
            .ok()
            .filter(|v| v.iter().all(serde_json::Value::is_number))
            .map(|_| {
                text.trim().trim_start_matches('[').trim_end_matches(']')
                    .split(',').map(|t| t.trim().to_string()).collect()
            });
        for dtype in [DataType::F32, DataType::I64] {
            let got = tokens.as_ref().map_or(1, Vec::len);
            let got = flat(&text, dtype, got);
            let want: Option<Vec<u8>> = tokens.as_ref().and_then(|t| {
                t.iter().map(|t| std_value(t, dtype)).collect::<Option<Vec<_>>>()
                    .map(|v| v.concat())
            });
            match want {
                Some(want) => prop_assert_eq!(got.ok(), Some(want), "{:?}", text),
                None => prop_assert!(got.is_err(), "{:?} read as {:?}", text, got),
            }
        }
    }
}

#[test]
fn halfway_between_two_f32s_the_text_decides() {
    // 1 + 2^-24 is exactly half way between 1 and the next f32; the f64 nearest each of
    // these texts is that halfway point, and only the digits after it tell which way.
    for text in [
        "1.000000059604644775390625",
        "1.000000059604644775390624",
        "1.000000059604644775390626",
        "1.0000000596046448",
    ] {
        let got = flat(&format!("[{text}]"), DataType::F32, 1).unwrap();
        let want = text.parse::<f32>().unwrap().to_le_bytes();
        assert_eq!(got, want, "{text}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// Numbers a few f64 ulps from a point half way between two f32s, written with 16 to 19
    /// significant digits: the fast path's f64 may land on either side of such a point, and
    /// must then leave the number to the full parser.
    #[test]
    fn numbers_next_to_an_f32_halfway_point_read_as_the_standard_library_reads_them(
        bits in 0x0080_0000u32..0x7F7F_FFFF,
        ulps in -12i64..=12,
        digits in 15usize..=18,
        negative in any::<bool>(),
    ) {
        let low = f32::from_bits(bits);
        let high = f32::from_bits(bits + 1);
        let half = (f64::from(low) + f64::from(high)) / 2.0;
        let near = f64::from_bits(half.to_bits().wrapping_add_signed(ulps));
        let sign = if negative { "-" } else { "" };
        let token = format!("{sign}{near:.digits$e}");
        let got = flat(&format!("[{token}]"), DataType::F32, 1).ok();
        prop_assert_eq!(got, std_value(&token, DataType::F32), "{}", token);
    }
}

#[test]
fn syntax_errors_say_where() {
    let e = flat("[1,\n 2,,3]", DataType::F32, 3).unwrap_err();
    assert!(
        matches!(&e, JsonError::Malformed(m) if m.ends_with("expected a value at line 2 column 4")),
        "{e:?}"
    );
    for bad in [
        "[1.]", "[-]", "[1e]", "[01]", "[1 2]", "[1,]", "[", "[1", "[1]]", "[+1]",
    ] {
        let e = flat(bad, DataType::F32, 1).unwrap_err();
        assert!(matches!(&e, JsonError::Malformed(_)), "{bad}: {e:?}");
    }
    // A JSON value that is not a number of the type is the input's fault, not the body's.
    for bad in ["[true]", "[null]", "[\"1\"]", "[{}]"] {
        let e = flat(bad, DataType::F32, 1).unwrap_err();
        assert!(
            matches!(&e, JsonError::Invalid(m) if m.contains("element 0")),
            "{bad}: {e:?}"
        );
    }
}

#[test]
fn counted_rows_stop_one_past_the_most() {
    let rows =
        |text: &str| Reader::new(text.as_bytes(), "test").tensor_rows(DataType::I32, &[2], 3, "x");
    let (bytes, n) = rows("[[1,2],[3,4]]").unwrap();
    assert_eq!((bytes.len(), n), (16, 2));
    let e = rows("[[1,2],[3,4],[5,6],[7,8]]").unwrap_err();
    assert_eq!(e, JsonError::TooManyRows { max: 3 });
    // Rows of the wrong length, and a flat list of values that are not rows.
    assert!(rows("[[1,2],[3]]").is_err());
    assert!(rows("[1,2]").is_err());
}

#[test]
fn skipped_values_end_where_they_end() {
    let text = br#"{"a": [1, {"b": "]\""}], "c": "x,y", "d": -1.5e3, "e": {}}"#;
    let mut r = Reader::new(text, "test");
    let mut seen = Vec::new();
    r.object(|r, key| -> Result<(), JsonError> {
        seen.push((
            key.to_string(),
            String::from_utf8(r.skip()?.to_vec()).unwrap(),
        ));
        Ok(())
    })
    .unwrap();
    r.end().unwrap();
    let want = [
        ("a", r#"[1, {"b": "]\""}]"#),
        ("c", r#""x,y""#),
        ("d", "-1.5e3"),
        ("e", "{}"),
    ];
    assert_eq!(
        seen,
        want.map(|(k, v)| (k.to_string(), v.to_string())).to_vec()
    );
}
