//! KServe V2 / Open Inference Protocol bodies: JSON tensors and the binary tensor data
//! extension, in and out.

use std::time::Duration;

use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::tensor::{element_count, DataType, Tensor};

use super::error::ApiError;

/// Nesting deeper than this in `data` is refused (a model input rarely has more than 8 dims).
const MAX_DATA_DEPTH: usize = 32;

#[derive(Debug, Deserialize)]
pub(crate) struct InferRequest {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
    pub inputs: Vec<RequestInput>,
    #[serde(default)]
    pub outputs: Option<Vec<RequestOutput>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RequestInput {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
    /// Kept as text and parsed straight into the tensor's bytes.
    #[serde(default)]
    pub data: Option<Box<serde_json::value::RawValue>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RequestOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
}

/// A parsed request: named tensors plus what the client asked of the response.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub id: Option<String>,
    pub inputs: Vec<(String, Tensor)>,
    /// Requested outputs (name, binary?), or `None` for all outputs.
    pub outputs: Option<Vec<(String, bool)>>,
    /// `parameters.binary_data_output`: every output in binary unless it says otherwise.
    pub binary_default: bool,
    /// `parameters.timeout` in microseconds, as Triton takes it.
    pub timeout: Option<Duration>,
}

fn param_bool(p: &Option<Map<String, Value>>, key: &str) -> Result<Option<bool>, ApiError> {
    match p.as_ref().and_then(|m| m.get(key)) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(ApiError::MalformedBody(format!(
            "parameter {key:?} must be true or false, got {other}"
        ))),
    }
}

fn param_u64(
    p: &Option<Map<String, Value>>,
    key: &str,
    what: &str,
) -> Result<Option<u64>, ApiError> {
    match p.as_ref().and_then(|m| m.get(key)) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ApiError::MalformedBody(format!(
                "{what}: parameter {key:?} must be a non-negative integer, got {v}"
            ))
        }),
    }
}

/// Parses a JSON body, or the JSON header of a binary body followed by the tensor bytes.
/// `header_len` is the `Inference-Header-Content-Length` value when present.
pub(crate) fn parse_request(body: &[u8], header_len: Option<usize>) -> Result<Parsed, ApiError> {
    match header_len {
        Some(n) if n > body.len() => Err(header_too_long(n, body.len())),
        Some(n) => parse_parts(&body[..n], body[n..].to_vec()),
        None => parse_parts(body, Vec::new()),
    }
}

pub(crate) fn header_too_long(header_len: usize, body_len: usize) -> ApiError {
    ApiError::MalformedBody(format!(
        "Inference-Header-Content-Length is {header_len} but the body has only {body_len} bytes"
    ))
}

/// [`parse_request`] on a body already split into its JSON and the binary bytes after it. An
/// input whose `binary_data_size` covers all of `binary` takes the buffer itself (no copy: the
/// common single-input request); several binary inputs each copy their share.
pub(crate) fn parse_parts(json: &[u8], mut binary: Vec<u8>) -> Result<Parsed, ApiError> {
    let total = binary.len();
    let mut offset = 0usize;
    let req: InferRequest = serde_json::from_slice(json)
        .map_err(|e| ApiError::MalformedBody(format!("invalid inference request JSON: {e}")))?;
    let timeout = param_u64(&req.parameters, "timeout", "request")?.map(Duration::from_micros);
    let binary_default = param_bool(&req.parameters, "binary_data_output")?.unwrap_or(false);
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for input in req.inputs {
        let what = format!("input {:?}", input.name);
        let dtype = DataType::from_v2_name(&input.datatype).ok_or_else(|| {
            ApiError::InvalidInput(format!(
                "{what}: unsupported datatype {:?}; use one of {}",
                input.datatype,
                DataType::ALL.map(DataType::v2_name).join(", ")
            ))
        })?;
        let shape = input
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<usize>, _>>()
            .map_err(|_| {
                ApiError::InvalidInput(format!(
                    "{what}: shape {:?} has a negative dimension",
                    input.shape
                ))
            })?;
        let count = element_count(&shape)
            .filter(|n| n.checked_mul(dtype.size()).is_some())
            .ok_or_else(|| {
                ApiError::InvalidInput(format!("{what}: shape {shape:?} is too large"))
            })?;
        let data = match (
            param_u64(&input.parameters, "binary_data_size", &what)?,
            input.data,
        ) {
            (Some(_), Some(_)) => {
                return Err(ApiError::MalformedBody(format!(
                    "{what} has both `data` and `binary_data_size`"
                )))
            }
            (Some(size), None) => {
                let size = usize::try_from(size).unwrap_or(usize::MAX);
                let left = total - offset;
                if size > left {
                    return Err(ApiError::MalformedBody(format!(
                        "{what}: binary_data_size {size} runs past the end of the body ({left} bytes left)"
                    )));
                }
                if size != count * dtype.size() {
                    return Err(ApiError::InvalidInput(format!(
                        "{what}: shape {shape:?} of {dtype} needs {} bytes, binary_data_size is {size}",
                        count * dtype.size()
                    )));
                }
                let mine = if size == 0 {
                    Vec::new()
                } else if offset == 0 && size == total {
                    std::mem::take(&mut binary)
                } else {
                    binary[offset..offset + size].to_vec()
                };
                offset += size;
                mine
            }
            (None, Some(raw)) => json_data_text(raw.get(), dtype, &shape, &what)?,
            (None, None) => {
                return Err(ApiError::MalformedBody(format!(
                    "{what} has neither `data` nor `binary_data_size`"
                )))
            }
        };
        let tensor = Tensor::new(dtype, shape, data)
            .map_err(|e| ApiError::InvalidInput(format!("{what}: {e}")))?;
        inputs.push((input.name, tensor));
    }
    if offset < total {
        return Err(ApiError::MalformedBody(format!(
            "{} bytes of binary data follow the inputs that no input claims",
            total - offset
        )));
    }
    if let Some(list) = &req.outputs {
        // Each output once: a repeated name would repeat its tensor in the response. A set, not
        // a pairwise scan: the list is as long as the client makes it.
        let mut seen = std::collections::HashSet::with_capacity(list.len());
        if let Some(o) = list.iter().find(|o| !seen.insert(o.name.as_str())) {
            return Err(ApiError::MalformedBody(format!(
                "output {:?} is requested more than once",
                o.name
            )));
        }
    }
    let outputs = match req.outputs {
        None => None,
        Some(list) => Some(
            list.into_iter()
                .map(|o| {
                    Ok((
                        o.name,
                        param_bool(&o.parameters, "binary_data")?.unwrap_or(binary_default),
                    ))
                })
                .collect::<Result<Vec<_>, ApiError>>()?,
        ),
    };
    Ok(Parsed {
        id: req.id,
        inputs,
        outputs,
        binary_default,
        timeout,
    })
}

/// Parses the text of a JSON array of numbers or booleans, flat or nested (row-major), straight
/// into little-endian bytes of `dtype`, checking the count, every value's range and, when
/// nested, that every array has the length the shape gives it (so `[[1,2,3],[4,5,6,7,8]]` is
/// not read as two rows of 4). No JSON tree is built: the text was already checked as JSON by
/// the request's parser.
pub(crate) fn json_data_text(
    text: &str,
    dtype: DataType,
    shape: &[usize],
    what: &str,
) -> Result<Vec<u8>, ApiError> {
    let count = element_count(shape)
        .ok_or_else(|| ApiError::InvalidInput(format!("{what}: shape {shape:?} is too large")))?;
    let bytes = text.as_bytes();
    // Every element takes at least one character and a separator: the text bounds what can
    // arrive, whatever the shape claims.
    let most = count.min(bytes.len() / 2 + 1);
    let mut out = Vec::with_capacity(most.saturating_mul(dtype.size()));
    // Per open array, the elements (values or arrays) seen in it so far.
    let mut open: Vec<usize> = Vec::new();
    // How deep the values sit; 1 is flat.
    let mut leaf_depth: Option<usize> = None;
    let (mut n, mut i) = (0usize, 0usize);
    let nesting = |detail: String| {
        ApiError::InvalidInput(format!(
            "{what}: data is nested in a way that does not match shape {shape:?}: {detail}"
        ))
    };
    while i < bytes.len() {
        match bytes[i] {
            b'[' => {
                if let Some(c) = open.last_mut() {
                    *c += 1;
                }
                open.push(0);
                if open.len() > MAX_DATA_DEPTH {
                    return Err(ApiError::MalformedBody(format!(
                        "{what}: data is nested more than {MAX_DATA_DEPTH} levels deep"
                    )));
                }
                i += 1;
            }
            b']' => {
                let depth = open.len();
                let Some(len) = open.pop() else {
                    return Err(ApiError::MalformedBody(format!(
                        "{what}: data has an unmatched `]`"
                    )));
                };
                if let Some(leaf) = leaf_depth.filter(|&l| l > 1) {
                    // Above the values an array has one dim's length; holding the values, the
                    // product of the dims left.
                    let want = if depth < leaf {
                        shape.get(depth - 1).copied()
                    } else {
                        shape.get(depth - 1..).and_then(element_count)
                    };
                    if want != Some(len) {
                        return Err(nesting(format!(
                            "an array at depth {depth} has {len} elements, not {}",
                            want.map_or_else(|| "any".to_string(), |w| w.to_string())
                        )));
                    }
                }
                i += 1;
            }
            b',' | b' ' | b'\n' | b'\r' | b'\t' => i += 1,
            _ => {
                let end = bytes[i..]
                    .iter()
                    .position(|b| matches!(b, b',' | b']' | b' ' | b'\n' | b'\r' | b'\t'))
                    .map_or(bytes.len(), |p| i + p);
                let token = &text[i..end];
                i = end;
                if let Some(c) = open.last_mut() {
                    *c += 1;
                }
                match leaf_depth {
                    None => leaf_depth = Some(open.len()),
                    Some(l) if l != open.len() => {
                        return Err(nesting(format!("values at depths {l} and {}", open.len())))
                    }
                    Some(_) => {}
                }
                if n < count {
                    push_element(&mut out, token, dtype).ok_or_else(|| {
                        let shown: String = token.chars().take(40).collect();
                        ApiError::InvalidInput(format!(
                            "{what}: element {n} ({shown}) is not a valid {dtype}"
                        ))
                    })?;
                }
                n += 1;
            }
        }
    }
    if n != count {
        return Err(ApiError::InvalidInput(format!(
            "{what}: shape needs {count} elements, data has {n}"
        )));
    }
    Ok(out)
}

/// Appends one JSON scalar (`token`) as `dtype`; `None` when it is not a valid value of it.
fn push_element(out: &mut Vec<u8>, token: &str, dtype: DataType) -> Option<()> {
    macro_rules! int {
        ($t:ty) => {{
            let n: $t = <$t>::try_from(token.parse::<i128>().ok()?).ok()?;
            out.extend_from_slice(&n.to_le_bytes());
        }};
    }
    let float = || -> Option<f64> {
        // JSON numbers only (no `inf`, `nan` or quoted values), and finite in f64.
        let first = *token.as_bytes().first()?;
        let v = (first == b'-' || first.is_ascii_digit()).then(|| token.parse::<f64>().ok())??;
        v.is_finite().then_some(v)
    };
    match dtype {
        DataType::Bool => out.push(match token {
            "true" => 1,
            "false" => 0,
            _ => return None,
        }),
        DataType::U8 => int!(u8),
        DataType::U16 => int!(u16),
        DataType::U32 => int!(u32),
        DataType::U64 => int!(u64),
        DataType::I8 => int!(i8),
        DataType::I16 => int!(i16),
        DataType::I32 => int!(i32),
        DataType::I64 => int!(i64),
        // Out of the type's range is an error, not infinity.
        DataType::F16 => {
            let v = half::f16::from_f64(float()?);
            out.extend_from_slice(&v.is_finite().then_some(v)?.to_le_bytes());
        }
        DataType::F32 => {
            let v = float()? as f32;
            out.extend_from_slice(&v.is_finite().then_some(v)?.to_le_bytes());
        }
        DataType::F64 => out.extend_from_slice(&float()?.to_le_bytes()),
    }
    Some(())
}

/// Serializes a tensor's elements as a flat JSON array straight from its bytes.
pub(crate) struct JsonData<'a>(pub(crate) &'a Tensor);

impl Serialize for JsonData<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let t = self.0;
        let mut seq = s.serialize_seq(Some(t.element_count()))?;
        macro_rules! each {
            ($n:literal, $conv:expr) => {
                for c in t.data.chunks_exact($n) {
                    let bytes: [u8; $n] = c.try_into().expect("exact chunk");
                    seq.serialize_element(&$conv(bytes))?;
                }
            };
        }
        match t.dtype {
            DataType::Bool => each!(1, |b: [u8; 1]| b[0] != 0),
            DataType::U8 => each!(1, u8::from_le_bytes),
            DataType::I8 => each!(1, i8::from_le_bytes),
            DataType::U16 => each!(2, u16::from_le_bytes),
            DataType::I16 => each!(2, i16::from_le_bytes),
            DataType::F16 => each!(2, |b| half::f16::from_le_bytes(b).to_f32()),
            DataType::U32 => each!(4, u32::from_le_bytes),
            DataType::I32 => each!(4, i32::from_le_bytes),
            DataType::F32 => each!(4, f32::from_le_bytes),
            DataType::U64 => each!(8, u64::from_le_bytes),
            DataType::I64 => each!(8, i64::from_le_bytes),
            DataType::F64 => each!(8, f64::from_le_bytes),
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct ResponseOutput<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [usize],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData<'a>>,
}

#[derive(Serialize)]
struct Response<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<ResponseOutput<'a>>,
}

/// An encoded response body; `header_len` is set when binary tensors follow the JSON.
pub(crate) struct Encoded {
    pub body: Vec<u8>,
    pub header_len: Option<usize>,
}

/// Encodes the chosen outputs (name, tensor, binary?) in the order given.
pub(crate) fn encode_response(
    model: &str,
    version: &str,
    id: Option<&str>,
    outputs: &[(&str, &Tensor, bool)],
) -> Encoded {
    let resp = Response {
        model_name: model,
        model_version: version,
        id,
        outputs: outputs
            .iter()
            .map(|&(name, t, binary)| ResponseOutput {
                name,
                datatype: t.dtype.v2_name(),
                shape: &t.shape,
                parameters: binary.then(|| serde_json::json!({"binary_data_size": t.data.len()})),
                data: (!binary).then_some(JsonData(t)),
            })
            .collect(),
    };
    let mut body = serde_json::to_vec(&resp).expect("response serializes");
    if !outputs.iter().any(|o| o.2) {
        return Encoded {
            body,
            header_len: None,
        };
    }
    let header_len = body.len();
    for (_, t, binary) in outputs {
        if *binary {
            body.extend_from_slice(&t.data);
        }
    }
    Encoded {
        body,
        header_len: Some(header_len),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_and_flat_data_give_the_same_tensor() {
        let nested =
            br#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4.5]]}]}"#;
        let flat =
            br#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3,4.5]}]}"#;
        let a = parse_request(nested, None).unwrap();
        let b = parse_request(flat, None).unwrap();
        assert_eq!(a.inputs, b.inputs);
        assert_eq!(a.inputs[0].1.to_f32(), vec![1.0, 2.0, 3.0, 4.5]);
    }

    #[test]
    fn float_values_out_of_their_types_range_are_refused() {
        for (dtype, value) in [("FP16", "70000"), ("FP32", "1e39"), ("FP64", "1e400")] {
            let body = format!(
                r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"{dtype}","data":[{value}]}}]}}"#
            );
            let e = parse_request(body.as_bytes(), None).unwrap_err();
            assert!(
                matches!(&e, ApiError::InvalidInput(m) if m.contains(value)),
                "{dtype} {value}: {e:?}"
            );
        }
        // The largest finite values still pass.
        let body =
            br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP16","data":[65504, -65504]}]}"#;
        assert!(parse_request(body, None).is_ok());
    }

    #[test]
    fn nested_data_must_match_the_shape() {
        let data = |shape: &str, data: &str| {
            format!(
                r#"{{"inputs":[{{"name":"x","shape":{shape},"datatype":"INT32","data":{data}}}]}}"#
            )
        };
        for (shape, bad) in [
            ("[2,4]", "[[1,2,3],[4,5,6,7,8]]"),
            ("[2,2]", "[[1,2],3,4]"),
            ("[2,2]", "[[[1,2]],[[3,4]]]"),
            ("[2,2,2]", "[[[1,2],[3,4]],[[5,6,7],[8]]]"),
        ] {
            let e = parse_request(data(shape, bad).as_bytes(), None).unwrap_err();
            assert!(
                matches!(&e, ApiError::InvalidInput(m) if m.contains("nested")),
                "{bad}: {e:?}"
            );
        }
        // Fully nested, nested down to rows of the remaining dims, and flat.
        for (shape, good) in [
            ("[2,2,2]", "[[[1,2],[3,4]],[[5,6],[7,8]]]"),
            ("[2,2,2]", "[[1,2,3,4],[5,6,7,8]]"),
            ("[2,2,2]", "[1,2,3,4,5,6,7,8]"),
        ] {
            let p = parse_request(data(shape, good).as_bytes(), None).unwrap();
            assert_eq!(p.inputs[0].1.data.len(), 32, "{good}");
        }
    }

    #[test]
    fn integer_ranges_are_checked() {
        let body = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT8","data":[300]}]}"#;
        let e = parse_request(body, None).unwrap_err();
        assert!(
            matches!(&e, ApiError::InvalidInput(m) if m.contains("300") && m.contains("INT8")),
            "{e:?}"
        );
        let body = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"UINT64","data":[-1]}]}"#;
        assert!(parse_request(body, None).is_err());
        let body = br#"{"inputs":[{"name":"x","shape":[2],"datatype":"BOOL","data":[true, 1]}]}"#;
        assert!(parse_request(body, None).is_err());
    }

    #[test]
    fn binary_tail_is_taken_whole_or_shared_out() {
        let one = br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        let tail: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let ptr = tail.as_ptr();
        let p = parse_parts(one, tail.clone()).unwrap();
        assert_eq!(p.inputs[0].1.to_f32(), vec![1.5, -2.0]);
        // One input claiming the whole tail keeps the buffer it came in.
        let p = parse_parts(one, tail).unwrap();
        assert_eq!(p.inputs[0].1.data.as_ptr(), ptr);
        // Two inputs share it out in order; a second claim after a whole take runs past the end.
        let two = br#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}},{"name":"b","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}}]}"#;
        let tail: Vec<u8> = [3.0f32, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let p = parse_parts(two, tail.clone()).unwrap();
        assert_eq!(
            (p.inputs[0].1.to_f32(), p.inputs[1].1.to_f32()),
            (vec![3.0], vec![4.0])
        );
        let greedy = br#"{"inputs":[{"name":"a","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}},{"name":"b","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}}]}"#;
        let e = parse_parts(greedy, tail.clone()).unwrap_err();
        assert!(
            matches!(&e, ApiError::MalformedBody(m) if m.contains("runs past")),
            "{e:?}"
        );
        // Empty inputs claim nothing; bytes nobody claims are refused.
        let empty = br#"{"inputs":[{"name":"a","shape":[0],"datatype":"FP32","parameters":{"binary_data_size":0}},{"name":"b","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}}]}"#;
        let e = parse_parts(empty, tail).unwrap_err();
        assert!(
            matches!(&e, ApiError::MalformedBody(m) if m.contains("4 bytes")),
            "{e:?}"
        );
    }

    #[test]
    fn binary_inputs_and_outputs() {
        let header = br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}],"outputs":[{"name":"y","parameters":{"binary_data":true}}]}"#;
        let mut body = header.to_vec();
        body.extend_from_slice(&1.5f32.to_le_bytes());
        body.extend_from_slice(&(-2.0f32).to_le_bytes());
        let p = parse_request(&body, Some(header.len())).unwrap();
        assert_eq!(p.inputs[0].1.to_f32(), vec![1.5, -2.0]);
        assert_eq!(p.outputs, Some(vec![("y".to_string(), true)]));
        // A size that disagrees with the shape, and bytes nobody claims, are refused.
        assert!(parse_request(&body[..body.len() - 1], Some(header.len())).is_err());
        let mut extra = body.clone();
        extra.push(0);
        assert!(parse_request(&extra, Some(header.len())).is_err());
        assert!(parse_request(&body, Some(body.len() + 1)).is_err());

        let t = Tensor::from_f32(vec![2], &[1.5, -2.0]).unwrap();
        let enc = encode_response("m", "1", Some("r1"), &[("y", &t, true)]);
        let n = enc.header_len.unwrap();
        let head: Value = serde_json::from_slice(&enc.body[..n]).unwrap();
        assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert_eq!(head["id"], "r1");
        assert_eq!(&enc.body[n..], &t.data[..]);
    }

    #[test]
    fn json_output_of_every_dtype_round_trips() {
        for dtype in DataType::ALL {
            let values = match dtype {
                DataType::Bool => "[true,false,true]",
                DataType::U8 | DataType::U16 | DataType::U32 | DataType::U64 => "[0,7,200]",
                DataType::I8 => "[-128,0,127]",
                DataType::F16 | DataType::F32 | DataType::F64 => "[-1.5,0.25,3.0]",
                _ => "[-5,0,9]",
            };
            let body = format!(
                r#"{{"inputs":[{{"name":"x","shape":[1,3],"datatype":"{dtype}","data":{values}}}]}}"#
            );
            let p = parse_request(body.as_bytes(), None).unwrap();
            let t = &p.inputs[0].1;
            let enc = encode_response("m", "1", None, &[("x", t, false)]);
            let v: Value = serde_json::from_slice(&enc.body).unwrap();
            let again: Value = serde_json::from_str(values).unwrap();
            let got = &v["outputs"][0]["data"];
            let same = got
                .as_array()
                .unwrap()
                .iter()
                .zip(again.as_array().unwrap())
                .all(|(a, b)| match (a.as_f64(), b.as_f64()) {
                    (Some(x), Some(y)) => x == y,
                    _ => a == b,
                });
            assert!(same, "{dtype}: {got} vs {again}");
            assert_eq!(v["outputs"][0]["datatype"], dtype.v2_name());
        }
    }
}
