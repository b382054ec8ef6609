//! A `ModelInferRequest`'s wire format counted before it is decoded: what decoding would
//! allocate is bounded by what arrived.
//!
//! prost turns each entry of a repeated message field into a struct of its own: an empty
//! `inputs` entry is 2 bytes on the wire and about 300 bytes decoded, so a 16 MiB message of
//! them decoded into gigabytes before any check ran (docs/BENCHMARKS.md). Packed varints grow
//! up to eight times (a one-byte `int64` becomes eight), and every empty `bytes` entry becomes
//! a buffer handle. This walks the message without allocating, counts the tensors, parameters,
//! dimensions and typed values it holds, and refuses one whose counts no served model can use
//! (more tensors or parameters than [`MAX_TENSORS`] or [`MAX_PARAMETERS`], a shape longer than
//! [`MAX_DIMS`], `bytes_contents`, which no served datatype reads) or whose typed values would
//! decode to more than `typed_limit` bytes. Malformed wire data is refused here as prost would
//! refuse it, before anything is decoded.

use ortserve_core::call::CallError;

/// The most `inputs`, `outputs` or `raw_input_contents` entries a message may have.
pub(crate) const MAX_TENSORS: usize = 1024;
/// The most parameters a message may carry, its own and its tensors' together.
pub(crate) const MAX_PARAMETERS: usize = 1024;
/// The most dimensions a tensor's shape may have.
pub(crate) const MAX_DIMS: usize = 64;

/// Why a message was refused before it was decoded.
#[derive(Debug, PartialEq)]
pub(crate) enum Refused {
    /// Not a valid protobuf message (prost would say so too).
    Malformed(&'static str),
    /// Valid, but over one of the limits above, or typed values over the limit given.
    Over(CallError),
    /// More to walk than the work it was given ([`check_within`]).
    Heavy,
}

/// Counts `message` (a `ModelInferRequest` on the wire); `typed_limit` is the most bytes its
/// typed `contents` may decode to.
pub(crate) fn check(message: &[u8], typed_limit: usize) -> Result<(), Refused> {
    walk(message, typed_limit, usize::MAX)
}

/// What one field costs against [`check_within`]'s work, in bytes of packed values.
const FIELD_WORK: usize = 32;

/// [`check`], unless the message holds more than `work` to walk (a field counts
/// [`FIELD_WORK`], a byte of packed typed values one): `Ok(false)` then, with the message not
/// yet checked. Decoding costs about what walking does, so a message that passes within `work`
/// is light to decode too, however large its raw contents (prost takes them as slices).
pub(crate) fn check_within(
    message: &[u8],
    typed_limit: usize,
    work: usize,
) -> Result<bool, Refused> {
    match walk(message, typed_limit, work) {
        Ok(()) => Ok(true),
        Err(Refused::Heavy) => Ok(false),
        Err(e) => Err(e),
    }
}

fn walk(message: &[u8], typed_limit: usize, work: usize) -> Result<(), Refused> {
    let mut n = Counts {
        work,
        ..Counts::default()
    };
    let mut r = Reader(message);
    while let Some((field, wire)) = r.key()? {
        n.spend(FIELD_WORK)?;
        match (field, wire) {
            (4, LEN) => parameter(r.bytes()?, &mut n)?,
            (5, LEN) => {
                n.tensor("inputs", |n| &mut n.inputs)?;
                input(r.bytes()?, &mut n)?;
            }
            (6, LEN) => {
                n.tensor("outputs", |n| &mut n.outputs)?;
                output(r.bytes()?, &mut n)?;
            }
            (7, LEN) => {
                n.tensor("raw_input_contents", |n| &mut n.raw)?;
                r.bytes()?;
            }
            _ => r.skip(wire)?,
        }
    }
    if n.typed_bytes > typed_limit as u64 {
        return Err(Refused::Over(CallError::InvalidInput(format!(
            "the typed contents hold {} bytes of values, more than the {typed_limit} accepted; send large tensors as raw_input_contents",
            n.typed_bytes
        ))));
    }
    Ok(())
}

/// The most fields a repository request may have, its entries' and their values' included: its
/// two names and [`MAX_PARAMETERS`] entries of a key and a value of one field, with room to
/// spare. Without it, 16 MiB of two-byte fields took 0.2 s to walk and decode on the
/// connection's task, holding up the port's other connections as long.
pub(crate) const MAX_REPOSITORY_FIELDS: usize = 4 * MAX_PARAMETERS + 16;

/// Counts a `RepositoryModelLoadRequest` or `RepositoryModelUnloadRequest` on the wire: at
/// most [`MAX_PARAMETERS`] entries in its `parameters` map (field 3), and at most
/// [`MAX_REPOSITORY_FIELDS`] fields in all, inside the entries and their values too (a value
/// is a `ModelRepositoryParameter`, whose fields are scalars, strings and bytes). What is left
/// (names, a value's bytes) decodes to at most its own size.
pub(crate) fn check_repository(message: &[u8]) -> Result<(), Refused> {
    let mut fields = 0usize;
    let mut field = || {
        fields += 1;
        if fields > MAX_REPOSITORY_FIELDS {
            return Err(Refused::Over(CallError::InvalidInput(format!(
                "more than {MAX_REPOSITORY_FIELDS} fields: a repository request has its names \
                 and at most {MAX_PARAMETERS} parameters"
            ))));
        }
        Ok(())
    };
    let mut parameters = 0usize;
    let mut r = Reader(message);
    while let Some((number, wire)) = r.key()? {
        field()?;
        if (number, wire) != (3, LEN) {
            r.skip(wire)?;
            continue;
        }
        parameters += 1;
        if parameters > MAX_PARAMETERS {
            return Err(Refused::Over(CallError::InvalidInput(format!(
                "more than {MAX_PARAMETERS} parameters"
            ))));
        }
        map_entry(r.bytes()?, &mut field)?;
    }
    Ok(())
}

/// Walks a `parameters` map entry: its key (1) and its value (2), a message whose own fields
/// are scalars, strings or bytes (`InferParameter`, `ModelRepositoryParameter`), calling
/// `field` for every field of the entry and of its value.
fn map_entry(entry: &[u8], field: &mut impl FnMut() -> Result<(), Refused>) -> Result<(), Refused> {
    let mut r = Reader(entry);
    while let Some((number, wire)) = r.key()? {
        field()?;
        if (number, wire) != (2, LEN) {
            r.skip(wire)?;
            continue;
        }
        let mut value = Reader(r.bytes()?);
        while let Some((_, wire)) = value.key()? {
            field()?;
            value.skip(wire)?;
        }
    }
    Ok(())
}

const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const I32: u8 = 5;

#[derive(Default)]
struct Counts {
    /// Work left to walk with (see [`check_within`]).
    work: usize,
    inputs: usize,
    outputs: usize,
    raw: usize,
    parameters: usize,
    typed_bytes: u64,
}

impl Counts {
    fn spend(&mut self, work: usize) -> Result<(), Refused> {
        self.work = self.work.checked_sub(work).ok_or(Refused::Heavy)?;
        Ok(())
    }

    fn tensor(
        &mut self,
        what: &str,
        field: impl Fn(&mut Counts) -> &mut usize,
    ) -> Result<(), Refused> {
        let count = field(self);
        *count += 1;
        if *count > MAX_TENSORS {
            return Err(Refused::Over(CallError::InvalidInput(format!(
                "more than {MAX_TENSORS} {what} entries"
            ))));
        }
        Ok(())
    }

    fn parameter(&mut self) -> Result<(), Refused> {
        self.parameters += 1;
        if self.parameters > MAX_PARAMETERS {
            return Err(Refused::Over(CallError::InvalidInput(format!(
                "more than {MAX_PARAMETERS} parameters in the request and its tensors together"
            ))));
        }
        Ok(())
    }
}

/// An `InferInputTensor`: its shape's length, its parameters, its typed contents.
fn input(message: &[u8], n: &mut Counts) -> Result<(), Refused> {
    let mut r = Reader(message);
    let mut dims = 0usize;
    while let Some((field, wire)) = r.key()? {
        n.spend(FIELD_WORK)?;
        match (field, wire) {
            (3, LEN) => {
                let packed = r.bytes()?;
                n.spend(packed.len())?;
                dims += varints(packed)?;
            }
            (3, VARINT) => {
                r.varint()?;
                dims += 1;
            }
            (4, LEN) => parameter(r.bytes()?, n)?,
            (5, LEN) => contents(r.bytes()?, n)?,
            _ => r.skip(wire)?,
        }
        if dims > MAX_DIMS {
            return Err(Refused::Over(CallError::InvalidInput(format!(
                "a shape of more than {MAX_DIMS} dimensions"
            ))));
        }
    }
    Ok(())
}

/// A `parameters` map entry (the request's or a tensor's): counted, and its fields walked, its
/// value's too (an `InferParameter`'s fields are scalars and a string). Each field costs work:
/// 16 MiB of repeated fields in one entry took 0.11-0.16 s to decode on the connection's task
/// while the entry counted as one field (docs/BENCHMARKS.md).
fn parameter(entry: &[u8], n: &mut Counts) -> Result<(), Refused> {
    n.parameter()?;
    map_entry(entry, &mut || n.spend(FIELD_WORK))
}

/// An `InferRequestedOutputTensor`: its parameters.
fn output(message: &[u8], n: &mut Counts) -> Result<(), Refused> {
    let mut r = Reader(message);
    while let Some((field, wire)) = r.key()? {
        n.spend(FIELD_WORK)?;
        if (field, wire) == (2, LEN) {
            parameter(r.bytes()?, n)?;
        } else {
            r.skip(wire)?;
        }
    }
    Ok(())
}

/// An `InferTensorContents`: the bytes its values take decoded, each list packed or not.
fn contents(message: &[u8], n: &mut Counts) -> Result<(), Refused> {
    let mut r = Reader(message);
    while let Some((field, wire)) = r.key()? {
        n.spend(FIELD_WORK)?;
        // bool 1 byte decoded; int32 and uint32 4 (varints); int64 and uint64 8 (varints);
        // float 4 (fixed); double 8 (fixed).
        let width: u64 = match field {
            1 => 1,
            2 | 4 | 6 => 4,
            3 | 5 | 7 => 8,
            8 => {
                return Err(Refused::Over(CallError::InvalidInput(
                    "bytes_contents: BYTES tensors are not served".into(),
                )))
            }
            _ => {
                r.skip(wire)?;
                continue;
            }
        };
        let values = match (field, wire) {
            (_, LEN) => {
                let packed = r.bytes()?;
                n.spend(packed.len())?;
                match field {
                    6 => fixed(packed, 4)?,
                    7 => fixed(packed, 8)?,
                    _ => varints(packed)?,
                }
            }
            (6, I32) | (7, I64) | (1..=5, VARINT) => {
                r.skip(wire)?;
                1
            }
            _ => return Err(Refused::Malformed("a typed list with the wrong wire type")),
        };
        n.typed_bytes += values as u64 * width;
    }
    Ok(())
}

/// The values of a packed list of varints: its bytes whose high bit is clear.
fn varints(packed: &[u8]) -> Result<usize, Refused> {
    if packed.last().is_some_and(|b| b & 0x80 != 0) {
        return Err(Refused::Malformed("a packed varint runs past its list"));
    }
    Ok(packed.iter().filter(|&&b| b & 0x80 == 0).count())
}

/// The values of a packed list of `width`-byte numbers.
fn fixed(packed: &[u8], width: usize) -> Result<usize, Refused> {
    if packed.len() % width != 0 {
        return Err(Refused::Malformed(
            "a packed list of fixed-size numbers is cut short",
        ));
    }
    Ok(packed.len() / width)
}

/// The rest of a message, read field by field.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, Refused> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self
                .0
                .split_first()
                .ok_or(Refused::Malformed("a varint runs past the message"))?;
            self.0 = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Refused::Malformed("a varint longer than ten bytes"))
    }

    /// The next field's number and wire type, or `None` at the end.
    fn key(&mut self) -> Result<Option<(u64, u8)>, Refused> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = key >> 3;
        if field == 0 {
            return Err(Refused::Malformed("a field numbered 0"));
        }
        Ok(Some((field, (key & 7) as u8)))
    }

    fn bytes(&mut self) -> Result<&'a [u8], Refused> {
        let len = self.varint()?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= self.0.len())
            .ok_or(Refused::Malformed("a length runs past the message"))?;
        let (field, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(field)
    }

    fn take(&mut self, n: usize) -> Result<(), Refused> {
        if self.0.len() < n {
            return Err(Refused::Malformed(
                "a fixed-size field runs past the message",
            ));
        }
        self.0 = &self.0[n..];
        Ok(())
    }

    fn skip(&mut self, wire: u8) -> Result<(), Refused> {
        match wire {
            VARINT => self.varint().map(drop),
            I64 => self.take(8),
            LEN => self.bytes().map(drop),
            I32 => self.take(4),
            // Groups (3, 4) are not in the protocol's messages; 6 and 7 are not wire types.
            _ => Err(Refused::Malformed("an unsupported wire type")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::inference::model_infer_request::{
        InferInputTensor, InferRequestedOutputTensor,
    };
    use crate::proto::inference::{InferParameter, InferTensorContents, ModelInferRequest};
    use prost::Message;

    fn tensor(shape: Vec<i64>, contents: Option<InferTensorContents>) -> InferInputTensor {
        InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape,
            parameters: Default::default(),
            contents,
        }
    }

    fn over(message: &[u8], limit: usize) -> String {
        match check(message, limit) {
            Err(Refused::Over(e)) => e.message(),
            other => panic!("not refused over a limit: {other:?}"),
        }
    }

    #[test]
    fn a_request_prost_makes_is_counted_and_passes() {
        let mut params = std::collections::HashMap::new();
        params.insert("timeout".to_string(), InferParameter::default());
        let req = ModelInferRequest {
            model_name: "mlp".into(),
            id: "x".into(),
            parameters: params.clone(),
            inputs: vec![tensor(
                vec![2, 4],
                Some(InferTensorContents {
                    fp32_contents: vec![1.0; 8],
                    int64_contents: vec![1, 300, -1],
                    ..Default::default()
                }),
            )],
            outputs: vec![InferRequestedOutputTensor {
                name: "logits".into(),
                parameters: params,
            }],
            raw_input_contents: vec![bytes::Bytes::from_static(&[0; 32])],
            ..Default::default()
        };
        let wire = req.encode_to_vec();
        // 8 floats (32 bytes) and 3 int64s (24 bytes) decoded.
        assert_eq!(check(&wire, 56), Ok(()));
        assert!(over(&wire, 55).contains("56 bytes of values"));
    }

    #[test]
    fn entries_past_the_limits_are_refused_before_decoding() {
        // Empty inputs, 2 bytes each: refused at the first past the limit.
        let empties = [0x2a, 0x00].repeat(MAX_TENSORS + 1);
        assert_eq!(check(&empties[..2 * MAX_TENSORS], 0), Ok(()));
        assert!(over(&empties, 0).contains("inputs"));
        for field in [0x32, 0x3a] {
            let many = [field, 0x00].repeat(MAX_TENSORS + 1);
            assert!(matches!(check(&many, 0), Err(Refused::Over(_))));
        }
        let params = [0x22, 0x00].repeat(MAX_PARAMETERS + 1);
        assert!(over(&params, 0).contains("parameters"));
        let long_shape = tensor(vec![1; MAX_DIMS + 1], None);
        let req = ModelInferRequest {
            inputs: vec![long_shape],
            ..Default::default()
        };
        assert!(over(&req.encode_to_vec(), 0).contains("dimensions"));
        let bytes = ModelInferRequest {
            inputs: vec![tensor(
                vec![1],
                Some(InferTensorContents {
                    bytes_contents: vec![vec![]],
                    ..Default::default()
                }),
            )],
            ..Default::default()
        };
        assert!(over(&bytes.encode_to_vec(), 1 << 20).contains("bytes_contents"));
    }

    #[test]
    fn packed_and_unpacked_values_are_counted_at_their_decoded_width() {
        // int64_contents (field 3) packed: three one-byte varints, 24 bytes decoded.
        let contents = [0x1a, 0x03, 0x01, 0x02, 0x03];
        // Unpacked: one tag each.
        let unpacked = [0x18, 0x01, 0x18, 0x02];
        for (c, decoded) in [(&contents[..], 24), (&unpacked[..], 16)] {
            let mut t = vec![0x2a, c.len() as u8];
            t.extend_from_slice(c);
            let mut m = vec![0x2a, t.len() as u8];
            m.extend_from_slice(&t);
            assert_eq!(check(&m, decoded), Ok(()), "{c:?}");
            assert!(matches!(check(&m, decoded - 1), Err(Refused::Over(_))));
        }
    }

    #[test]
    fn a_message_light_to_walk_is_checked_within_its_work_whatever_its_raw_bytes() {
        let raw = ModelInferRequest {
            model_name: "cnn".into(),
            inputs: vec![tensor(vec![8, 3, 64, 64], None)],
            raw_input_contents: vec![bytes::Bytes::from(vec![0u8; 8 * 12288 * 4])],
            ..Default::default()
        };
        assert_eq!(check_within(&raw.encode_to_vec(), 0, 4096), Ok(true));
        // Packed values count their bytes; fields count FIELD_WORK each.
        let typed = ModelInferRequest {
            inputs: vec![tensor(
                vec![1024],
                Some(InferTensorContents {
                    fp32_contents: vec![1.0; 1024],
                    ..Default::default()
                }),
            )],
            ..Default::default()
        };
        let wire = typed.encode_to_vec();
        assert_eq!(check_within(&wire, 1 << 20, 4096), Ok(false));
        assert_eq!(check_within(&wire, 1 << 20, 8192), Ok(true));
        let unknown = [0x78, 0x01].repeat(1000); // field 15, varint 1
        assert_eq!(check_within(&unknown, 0, 1000 * FIELD_WORK - 1), Ok(false));
        assert_eq!(check_within(&unknown, 0, 1000 * FIELD_WORK), Ok(true));
        // Fields inside a parameter entry and its value count too.
        let entry = entry_of_bools(0x22, 1000);
        assert_eq!(check_within(&entry, 0, 1000 * FIELD_WORK), Ok(false));
        assert_eq!(check_within(&entry, 0, 1003 * FIELD_WORK), Ok(true));
        // A refusal found within the work is a refusal.
        let empties = [0x2a, 0x00].repeat(MAX_TENSORS + 1);
        assert!(matches!(
            check_within(&empties, 0, usize::MAX / 2),
            Err(Refused::Over(_))
        ));
    }

    #[test]
    fn a_repository_call_is_refused_past_1024_parameters() {
        use crate::proto::inference::{ModelRepositoryParameter, RepositoryModelLoadRequest};
        let load = |entries: usize| RepositoryModelLoadRequest {
            model_name: "mlp".into(),
            parameters: (0..entries)
                .map(|i| (format!("k{i}"), ModelRepositoryParameter::default()))
                .collect(),
            ..Default::default()
        };
        assert_eq!(
            check_repository(&load(MAX_PARAMETERS).encode_to_vec()),
            Ok(())
        );
        assert!(matches!(
            check_repository(&load(MAX_PARAMETERS + 1).encode_to_vec()),
            Err(Refused::Over(_))
        ));
        // Entries count as they come, repeated keys too (decoding would keep the last).
        let same = [0x1a, 0x03, 0x0a, 0x01, b'k'].repeat(MAX_PARAMETERS + 1);
        assert!(matches!(check_repository(&same), Err(Refused::Over(_))));
        assert!(matches!(
            check_repository(&[0x1a, 0x05, 0x0a]),
            Err(Refused::Malformed(_))
        ));
        // Fields are counted wherever they are: at the top, in an entry, in its value.
        let over = |m: &[u8]| match check_repository(m) {
            Err(Refused::Over(e)) => e.message(),
            other => panic!("not refused over a limit: {other:?}"),
        };
        let unknown = [0xa0, 0x01, 0x00].repeat(MAX_REPOSITORY_FIELDS + 1); // field 20
        assert_eq!(
            check_repository(&unknown[..3 * MAX_REPOSITORY_FIELDS]),
            Ok(())
        );
        assert!(over(&unknown).contains("fields"));
        assert!(over(&entry_of_bools(0x1a, MAX_REPOSITORY_FIELDS)).contains("fields"));
        // A whole request at the limits passes.
        let mut full = load(MAX_PARAMETERS);
        full.repository_name = "r".into();
        for v in full.parameters.values_mut() {
            *v = ModelRepositoryParameter {
                parameter_choice: Some(
                    crate::proto::inference::model_repository_parameter::ParameterChoice::BoolParam(
                        true,
                    ),
                ),
            };
        }
        assert_eq!(check_repository(&full.encode_to_vec()), Ok(()));
    }

    /// A map entry with the key `k` under `tag` (the map's field and wire type) whose value holds
    /// `bool_param` (field 1 of both parameter messages) `count` times.
    fn entry_of_bools(tag: u8, count: usize) -> Vec<u8> {
        let bools = [0x08, 0x01].repeat(count);
        let mut value = vec![0x0a, 0x01, b'k', 0x12];
        value.extend(varint_bytes(bools.len()));
        value.extend(&bools);
        let mut entry = vec![tag];
        entry.extend(varint_bytes(value.len()));
        entry.extend(&value);
        entry
    }

    fn varint_bytes(mut n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
        out
    }

    #[test]
    fn malformed_wire_data_is_refused() {
        for bad in [
            &[0x2a, 0x05, 0x00][..],                         // a length past the end
            &[0x2a][..],                                     // a key and nothing after
            &[0xff; 11][..],                                 // a varint of eleven bytes
            &[0x0b][..],                                     // a group
            &[0x00, 0x00][..],                               // field 0
            &[0x2a, 0x03, 0x1a, 0x01, 0x80][..],             // a packed varint cut short
            &[0x2a, 0x05, 0x2a, 0x03, 0x32, 0x01, 0x00][..], // one byte of packed floats
        ] {
            assert!(
                matches!(check(bad, 1 << 20), Err(Refused::Malformed(_))),
                "{bad:?}"
            );
        }
        assert_eq!(check(&[], 0), Ok(()));
    }
}
