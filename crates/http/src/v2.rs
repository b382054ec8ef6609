//! KServe V2 / Open Inference Protocol bodies: JSON tensors and the binary tensor data
//! extension, in and out.

use std::time::Duration;

use bytes::Bytes;
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use ortserve_core::codec::Reader;
use ortserve_core::tensor::{element_count, DataType, Tensor};

use super::error::CallError;

/// What a syntax error in a V2 body starts with.
const SYNTAX: &str = "invalid inference request JSON";

/// An output the client asks for; typed by serde_json from its text (see [`Reader`]).
#[derive(Debug, Deserialize)]
pub(crate) struct RequestOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: Option<Params>,
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

/// A `parameters` object. A key given twice is refused, as a duplicated field is everywhere
/// else in a request (serde_json's map would keep the last one silently).
#[derive(Debug, Default)]
pub(crate) struct Params(Map<String, Value>);

impl<'de> Deserialize<'de> for Params {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Params, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = Params;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of parameters")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Params, A::Error> {
                let mut m = Map::new();
                while let Some(k) = a.next_key::<String>()? {
                    if m.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!(
                            "duplicate parameter `{k}`"
                        )));
                    }
                    let v = a.next_value()?;
                    m.insert(k, v);
                }
                Ok(Params(m))
            }
        }
        d.deserialize_map(Keys)
    }
}

fn param_bool(p: &Option<Params>, key: &str) -> Result<Option<bool>, CallError> {
    match p.as_ref().and_then(|m| m.0.get(key)) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(CallError::MalformedBody(format!(
            "parameter {key:?} must be true or false, got {other}"
        ))),
    }
}

fn param_u64(p: &Option<Params>, key: &str, what: &str) -> Result<Option<u64>, CallError> {
    match p.as_ref().and_then(|m| m.0.get(key)) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            CallError::MalformedBody(format!(
                "{what}: parameter {key:?} must be a non-negative integer, got {v}"
            ))
        }),
    }
}

/// Parses a JSON body, or the JSON header of a binary body followed by the tensor bytes.
/// `header_len` is the `Inference-Header-Content-Length` value when present.
pub(crate) fn parse_request(body: &[u8], header_len: Option<usize>) -> Result<Parsed, CallError> {
    match header_len {
        Some(n) if n > body.len() => Err(header_too_long(n, body.len())),
        Some(n) => parse_parts(&body[..n], Bytes::copy_from_slice(&body[n..])),
        None => parse_parts(body, Bytes::new()),
    }
}

pub(crate) fn header_too_long(header_len: usize, body_len: usize) -> CallError {
    CallError::MalformedBody(format!(
        "Inference-Header-Content-Length is {header_len} but the body has only {body_len} bytes"
    ))
}

/// [`parse_request`] on a body already split into its JSON and the binary bytes after it. Each
/// binary input's tensor is a slice of `binary`, not a copy.
pub(crate) fn parse_parts(json: &[u8], binary: Bytes) -> Result<Parsed, CallError> {
    let total = binary.len();
    let mut offset = 0usize;
    let req = read_request(json)?;
    let timeout = param_u64(&req.parameters, "timeout", "request")?.map(Duration::from_micros);
    let binary_default = param_bool(&req.parameters, "binary_data_output")?.unwrap_or(false);
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for input in req.inputs {
        let Input {
            name,
            what,
            dtype,
            shape,
            count,
            parameters,
            data,
        } = input;
        let data = match (param_u64(&parameters, "binary_data_size", &what)?, data) {
            (Some(_), Some(_)) => {
                return Err(CallError::MalformedBody(format!(
                    "{what} has both `data` and `binary_data_size`"
                )))
            }
            (Some(size), None) => {
                let size = usize::try_from(size).unwrap_or(usize::MAX);
                let left = total - offset;
                if size > left {
                    return Err(CallError::MalformedBody(format!(
                        "{what}: binary_data_size {size} runs past the end of the body ({left} bytes left)"
                    )));
                }
                if size != count * dtype.size() {
                    return Err(CallError::InvalidInput(format!(
                        "{what}: shape {shape:?} of {dtype} needs {} bytes, binary_data_size is {size}",
                        count * dtype.size()
                    )));
                }
                let mine = binary.slice(offset..offset + size);
                offset += size;
                mine
            }
            (None, Some(data)) => Bytes::from(data),
            (None, None) => {
                return Err(CallError::MalformedBody(format!(
                    "{what} has neither `data` nor `binary_data_size`"
                )))
            }
        };
        let tensor = Tensor::new(dtype, shape, data)
            .map_err(|e| CallError::InvalidInput(format!("{what}: {e}")))?;
        inputs.push((name, tensor));
    }
    if offset < total {
        return Err(CallError::MalformedBody(format!(
            "{} bytes of binary data follow the inputs that no input claims",
            total - offset
        )));
    }
    if let Some(list) = &req.outputs {
        // Each output once: a repeated name would repeat its tensor in the response. A set, not
        // a pairwise scan: the list is as long as the client makes it.
        let mut seen = std::collections::HashSet::with_capacity(list.len());
        if let Some(o) = list.iter().find(|o| !seen.insert(o.name.as_str())) {
            return Err(CallError::MalformedBody(format!(
                "output {:?} is requested more than once",
                o.name
            )));
        }
    }
    let outputs = match req.outputs {
        // No list, or an empty one: every output, as Triton answers both (its core fills an
        // empty request-output list with every output of the model).
        None => None,
        Some(list) if list.is_empty() => None,
        Some(list) => Some(
            list.into_iter()
                .map(|o| {
                    Ok((
                        o.name,
                        param_bool(&o.parameters, "binary_data")?.unwrap_or(binary_default),
                    ))
                })
                .collect::<Result<Vec<_>, CallError>>()?,
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

/// A V2 request as read from its JSON, each input's data already in tensor bytes.
struct Request {
    id: Option<String>,
    parameters: Option<Params>,
    inputs: Vec<Input>,
    outputs: Option<Vec<RequestOutput>>,
}

struct Input {
    name: String,
    /// `input "name"`, as errors about it start.
    what: String,
    dtype: DataType,
    shape: Vec<usize>,
    count: usize,
    parameters: Option<Params>,
    data: Option<Vec<u8>>,
}

/// Sets a member read from the body, refusing one that comes twice.
fn once<T>(r: &Reader, slot: &mut Option<T>, key: &str, value: T) -> Result<(), CallError> {
    if slot.is_some() {
        let e = r.error(r.position(), format!("duplicate field `{key}`"));
        return Err(e.into());
    }
    *slot = Some(value);
    Ok(())
}

fn missing(r: &Reader, at: usize, key: &str) -> CallError {
    r.error(at, format!("missing field `{key}`")).into()
}

/// Reads a V2 request body in one pass (see [`Reader`]).
fn read_request(text: &[u8]) -> Result<Request, CallError> {
    let mut r = Reader::new(text, SYNTAX);
    let (mut id, mut parameters, mut inputs, mut outputs) = (None, None, None, None);
    r.object(|r, key| match &*key {
        "id" => {
            let v = r.value::<Option<String>>()?;
            once(r, &mut id, "id", v)
        }
        "parameters" => {
            let v = r.value::<Option<Params>>()?;
            once(r, &mut parameters, "parameters", v)
        }
        "inputs" => {
            let mut list = Vec::new();
            r.array(|r| -> Result<(), CallError> {
                list.push(read_input(r)?);
                Ok(())
            })?;
            once(r, &mut inputs, "inputs", list)
        }
        "outputs" => {
            let v = r.value::<Option<Vec<RequestOutput>>>()?;
            once(r, &mut outputs, "outputs", v)
        }
        _ => Ok(r.ignore()?),
    })?;
    let Some(inputs) = inputs else {
        return Err(missing(&r, text.len(), "inputs"));
    };
    r.end()?;
    Ok(Request {
        id: id.flatten(),
        parameters: parameters.flatten(),
        inputs,
        outputs: outputs.flatten(),
    })
}

/// One input object. Its data is read as soon as the name, shape and datatype are known, as
/// clients send them first; data that comes before them is passed over by its brackets and read
/// at the object's end.
fn read_input(r: &mut Reader) -> Result<Input, CallError> {
    let (mut name, mut shape, mut datatype, mut parameters) = (None, None, None, None);
    let mut layout: Option<(String, DataType, Vec<usize>, usize)> = None;
    let mut data: Option<Vec<u8>> = None;
    // Where data that came early starts and ends.
    let mut later: Option<(usize, usize)> = None;
    r.object(|r, key| -> Result<(), CallError> {
        match &*key {
            "name" => {
                let v = r.value::<String>()?;
                once(r, &mut name, "name", v)?;
            }
            "shape" => {
                let v = r.value::<Vec<i64>>()?;
                once(r, &mut shape, "shape", v)?;
            }
            "datatype" => {
                let v = r.value::<String>()?;
                once(r, &mut datatype, "datatype", v)?;
            }
            "parameters" => {
                let v = r.value::<Option<Params>>()?;
                once(r, &mut parameters, "parameters", v)?;
            }
            "data" => {
                if data.is_some() || later.is_some() {
                    return Err(r.error(r.position(), "duplicate field `data`").into());
                }
                if let (Some(n), Some(s), Some(d)) = (&name, &shape, &datatype) {
                    let l = layout.insert(input_layout(n, s, d)?);
                    data = Some(r.tensor_data(l.1, &l.2, &l.0)?);
                } else {
                    let text = r.skip()?;
                    later = Some((r.position() - text.len(), r.position()));
                }
            }
            _ => r.ignore()?,
        }
        Ok(())
    })?;
    let end = r.position();
    let name = name.ok_or_else(|| missing(r, end, "name"))?;
    let shape = shape.ok_or_else(|| missing(r, end, "shape"))?;
    let datatype = datatype.ok_or_else(|| missing(r, end, "datatype"))?;
    let (what, dtype, shape, count) = match layout {
        Some(l) => l,
        None => input_layout(&name, &shape, &datatype)?,
    };
    if let Some((start, stop)) = later {
        let mut again = r.at(start);
        data = Some(again.tensor_data(dtype, &shape, &what)?);
        if again.position() != stop {
            return Err(again.error(again.position(), "expected `,` or `}`").into());
        }
    }
    Ok(Input {
        name,
        what,
        dtype,
        shape,
        count,
        parameters: parameters.flatten(),
        data,
    })
}

/// An input's datatype and shape checked: (`input "name"`, type, shape, element count).
fn input_layout(
    name: &str,
    shape: &[i64],
    datatype: &str,
) -> Result<(String, DataType, Vec<usize>, usize), CallError> {
    let what = format!("input {name:?}");
    let dtype = DataType::from_v2_name(datatype).ok_or_else(|| {
        CallError::InvalidInput(format!(
            "{what}: unsupported datatype {datatype:?}; use one of {}",
            DataType::ALL.map(DataType::v2_name).join(", ")
        ))
    })?;
    let dims = shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| {
            CallError::InvalidInput(format!("{what}: shape {shape:?} has a negative dimension"))
        })?;
    let count = element_count(&dims)
        .filter(|n| n.checked_mul(dtype.size()).is_some())
        .ok_or_else(|| CallError::InvalidInput(format!("{what}: shape {dims:?} is too large")))?;
    Ok((what, dtype, dims, count))
}

/// Tensor data given as JSON text on its own (see [`Reader::tensor_data`]); only whitespace may
/// follow it.
pub(crate) fn json_data_text(
    text: &str,
    dtype: DataType,
    shape: &[usize],
    what: &str,
) -> Result<Vec<u8>, CallError> {
    let mut r = Reader::new(text.as_bytes(), SYNTAX);
    let data = r.tensor_data(dtype, shape, what)?;
    r.end()?;
    Ok(data)
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

/// An encoded response body; `header_len` is set when binary tensors follow the JSON.
pub(crate) struct Encoded {
    pub body: Vec<u8>,
    pub header_len: Option<usize>,
}

/// Encodes the chosen outputs (name, tensor, binary?) in the order given. JSON data is written
/// straight from the tensor's bytes; non-finite floats as `NaN`, `Infinity` and `-Infinity`, as
/// Triton writes them and Python's `json` and `tritonclient` read them (serde_json would write
/// all three as `null`).
pub(crate) fn encode_response(
    model: &str,
    version: &str,
    id: Option<&str>,
    outputs: &[(&str, &Tensor, bool)],
) -> Encoded {
    let json_bytes: usize = outputs
        .iter()
        .filter(|o| !o.2)
        .map(|o| o.1.element_count() * 12)
        .sum();
    let mut body = Vec::with_capacity(128 + json_bytes);
    body.extend_from_slice(b"{\"model_name\":");
    string(&mut body, model);
    body.extend_from_slice(b",\"model_version\":");
    string(&mut body, version);
    if let Some(id) = id {
        body.extend_from_slice(b",\"id\":");
        string(&mut body, id);
    }
    body.extend_from_slice(b",\"outputs\":[");
    for (i, &(name, t, binary)) in outputs.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(b"{\"name\":");
        string(&mut body, name);
        body.extend_from_slice(b",\"datatype\":");
        string(&mut body, t.dtype.v2_name());
        body.extend_from_slice(b",\"shape\":");
        serde_json::to_writer(&mut body, &t.shape).expect("a Vec never fails to write");
        if binary {
            body.extend_from_slice(b",\"parameters\":{\"binary_data_size\":");
            number(&mut body, t.data.len());
            body.push(b'}');
        } else {
            body.extend_from_slice(b",\"data\":");
            write_data(&mut body, t);
        }
        body.push(b'}');
    }
    body.extend_from_slice(b"]}");
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

/// A JSON string, escaped.
fn string(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("a Vec never fails to write");
}

/// A finite number or an integer, as serde_json writes it.
fn number(out: &mut Vec<u8>, v: impl Serialize) {
    serde_json::to_writer(out, &v).expect("a Vec never fails to write");
}

/// A float as serde_json writes it, or its non-finite name.
fn float<T: Copy + Into<f64> + Serialize>(out: &mut Vec<u8>, v: T) {
    let x: f64 = v.into();
    if x.is_finite() {
        number(out, v);
    } else if x.is_nan() {
        out.extend_from_slice(b"NaN");
    } else if x > 0.0 {
        out.extend_from_slice(b"Infinity");
    } else {
        out.extend_from_slice(b"-Infinity");
    }
}

/// A tensor's elements as a flat JSON array, straight from its bytes.
fn write_data(out: &mut Vec<u8>, t: &Tensor) {
    out.push(b'[');
    macro_rules! each {
        ($n:literal, $conv:expr, $write:expr) => {
            for (i, c) in t.data.chunks_exact($n).enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let bytes: [u8; $n] = c.try_into().expect("exact chunk");
                $write(&mut *out, $conv(bytes));
            }
        };
    }
    match t.dtype {
        DataType::Bool => each!(1, |b: [u8; 1]| b[0] != 0, |o: &mut Vec<u8>, b: bool| o
            .extend_from_slice(if b { b"true" } else { b"false" })),
        DataType::U8 => each!(1, u8::from_le_bytes, number),
        DataType::I8 => each!(1, i8::from_le_bytes, number),
        DataType::U16 => each!(2, u16::from_le_bytes, number),
        DataType::I16 => each!(2, i16::from_le_bytes, number),
        DataType::F16 => each!(2, |b| half::f16::from_le_bytes(b).to_f32(), float),
        DataType::U32 => each!(4, u32::from_le_bytes, number),
        DataType::I32 => each!(4, i32::from_le_bytes, number),
        DataType::F32 => each!(4, f32::from_le_bytes, float),
        DataType::U64 => each!(8, u64::from_le_bytes, number),
        DataType::I64 => each!(8, i64::from_le_bytes, number),
        DataType::F64 => each!(8, f64::from_le_bytes, float),
    }
    out.push(b']');
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
    fn data_may_come_before_the_shape_and_datatype() {
        let first =
            br#"{"inputs":[{"data":[[1,2],[3,4.5]],"name":"x","shape":[2,2],"datatype":"FP32"}]}"#;
        let last =
            br#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4.5]]}]}"#;
        let middle =
            br#"{"inputs":[{"name":"x","data":[[1,2],[3,4.5]],"datatype":"FP32","shape":[2,2]}]}"#;
        let want = parse_request(last, None).unwrap().inputs;
        assert_eq!(parse_request(first, None).unwrap().inputs, want);
        assert_eq!(parse_request(middle, None).unwrap().inputs, want);
        // Early data is checked as strictly as data in its usual place.
        let bad = br#"{"inputs":[{"data":[1,2,3,],"name":"x","shape":[3],"datatype":"FP32"}]}"#;
        let e = parse_request(bad, None).unwrap_err();
        assert!(
            matches!(&e, CallError::MalformedBody(m) if m.contains("expected a value at line 1 column 27")),
            "{e:?}"
        );
        let nested =
            br#"{"inputs":[{"data":[[1,2],[3]],"name":"x","shape":[2,2],"datatype":"FP32"}]}"#;
        let e = parse_request(nested, None).unwrap_err();
        assert!(
            matches!(&e, CallError::InvalidInput(m) if m.contains("nested")),
            "{e:?}"
        );
    }

    #[test]
    fn a_scalar_input_may_have_members_after_its_data() {
        let last = br#"{"inputs":[{"name":"x","shape":[],"datatype":"FP32","data":1.5}]}"#;
        let middle =
            br#"{"inputs":[{"name":"x","shape":[],"datatype":"FP32","data":1.5,"parameters":{}}]}"#;
        let first = br#"{"inputs":[{"data":1.5,"name":"x","shape":[],"datatype":"FP32"}]}"#;
        let want = parse_request(last, None).unwrap().inputs;
        assert_eq!(want[0].1.to_f32(), vec![1.5]);
        assert_eq!(parse_request(middle, None).unwrap().inputs, want);
        assert_eq!(parse_request(first, None).unwrap().inputs, want);
        // A second bare value is not data: the object wants its next key there.
        for body in [
            &br#"{"inputs":[{"name":"x","shape":[],"datatype":"FP32","data":1.5,2.5}]}"#[..],
            br#"{"inputs":[{"data":1.5,2.5,"name":"x","shape":[],"datatype":"FP32"}]}"#,
        ] {
            let e = parse_request(body, None).unwrap_err();
            assert!(
                matches!(&e, CallError::MalformedBody(m) if m.contains("expected a string key")),
                "{e:?}"
            );
        }
    }

    #[test]
    fn bodies_that_are_not_json_requests_are_refused_with_where() {
        for (body, says) in [
            (
                &br#"{"inputs":[], "inputs":[]}"#[..],
                "duplicate field `inputs`",
            ),
            (
                br#"{"inputs":[{"name":"x","name":"y","shape":[1],"datatype":"FP32","data":[1]}]}"#,
                "duplicate field `name`",
            ),
            (
                br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1],"data":[2]}]}"#,
                "duplicate field `data`",
            ),
            (
                br#"{"inputs":[]} x"#,
                "trailing characters at line 1 column 15",
            ),
            (br#"{"outputs":[]}"#, "missing field `inputs`"),
            (
                br#"{"inputs":[{"shape":[1],"datatype":"FP32","data":[1]}]}"#,
                "missing field `name`",
            ),
            (
                br#"{"inputs":[{"name":"x","shape":[1],"data":[1]}]}"#,
                "missing field `datatype`",
            ),
            (
                br#"{"inputs":[{"name":"x","shape":"1","datatype":"FP32","data":[1]}]}"#,
                "invalid type: string \"1\", expected a sequence at line 1 column 34",
            ),
            // Members nobody reads are still JSON.
            (br#"{"inputs":[], "extra": [1, 2,]}"#, "at line 1 column 30"),
            (
                b"{\"inputs\":[],\n \"id\": 7}",
                "invalid type: integer `7`, expected a string at line 2 column 8",
            ),
            (b"[]", "expected an object at line 1 column 1"),
            (b"", "EOF while parsing an object at line 1 column 1"),
            (
                br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]"#,
                "EOF while parsing `,` or `}`",
            ),
        ] {
            let e = parse_request(body, None).unwrap_err();
            assert!(
                matches!(&e, CallError::MalformedBody(m) if m.starts_with(SYNTAX) && m.contains(says)),
                "{}: {e:?}",
                String::from_utf8_lossy(body)
            );
        }
        // Keys are JSON strings: escapes count, unknown members are passed over.
        let escaped = br#"{"inputs":[{"n\u0061me":"x","shape":[1],"datatype":"FP32","d\u0061ta":[1.5],"other":{"a":[]}}],"more":null}"#;
        assert_eq!(
            parse_request(escaped, None).unwrap().inputs[0].1.to_f32(),
            vec![1.5]
        );
    }

    #[test]
    fn float_values_out_of_their_types_range_are_refused() {
        for (dtype, value) in [("FP16", "70000"), ("FP32", "1e39"), ("FP64", "1e400")] {
            let body = format!(
                r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"{dtype}","data":[{value}]}}]}}"#
            );
            let e = parse_request(body.as_bytes(), None).unwrap_err();
            assert!(
                matches!(&e, CallError::InvalidInput(m) if m.contains(value)),
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
                matches!(&e, CallError::InvalidInput(m) if m.contains("nested")),
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
            matches!(&e, CallError::InvalidInput(m) if m.contains("300") && m.contains("INT8")),
            "{e:?}"
        );
        let body = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"UINT64","data":[-1]}]}"#;
        assert!(parse_request(body, None).is_err());
        let body = br#"{"inputs":[{"name":"x","shape":[2],"datatype":"BOOL","data":[true, 1]}]}"#;
        assert!(parse_request(body, None).is_err());
    }

    #[test]
    fn binary_tail_is_shared_out_without_a_copy() {
        let one = br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        let tail: Bytes = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into();
        // One input claiming the whole tail keeps the buffer it came in.
        let p = parse_parts(one, tail.clone()).unwrap();
        assert_eq!(p.inputs[0].1.to_f32(), vec![1.5, -2.0]);
        assert_eq!(p.inputs[0].1.data.as_ptr(), tail.as_ptr());
        // Two inputs share it out in order, each a slice of it.
        let two = br#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}},{"name":"b","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}}]}"#;
        let tail: Bytes = [3.0f32, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into();
        let p = parse_parts(two, tail.clone()).unwrap();
        assert_eq!(
            (p.inputs[0].1.to_f32(), p.inputs[1].1.to_f32()),
            (vec![3.0], vec![4.0])
        );
        assert_eq!(p.inputs[1].1.data.as_ptr(), tail[4..].as_ptr());
        let greedy = br#"{"inputs":[{"name":"a","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}},{"name":"b","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}}]}"#;
        let e = parse_parts(greedy, tail.clone()).unwrap_err();
        assert!(
            matches!(&e, CallError::MalformedBody(m) if m.contains("runs past")),
            "{e:?}"
        );
        // Empty inputs claim nothing; bytes nobody claims are refused.
        let empty = br#"{"inputs":[{"name":"a","shape":[0],"datatype":"FP32","parameters":{"binary_data_size":0}},{"name":"b","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}}]}"#;
        let e = parse_parts(empty, tail).unwrap_err();
        assert!(
            matches!(&e, CallError::MalformedBody(m) if m.contains("4 bytes")),
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
