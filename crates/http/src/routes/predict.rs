//! `POST /v1/models/{model}:predict`, TF-Serving style: `{"instances": [...]}` for tensor models;
//! for image models also multipart `image` parts, a raw `image/*` body, or `{"b64": ...}`
//! instances, answered with top-k labels.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

use crate::extract::{self, read_body};
use crate::routes::models::lookup;
use crate::{v2, ApiError, CallError};
use ortserve_core::app::{AppState, Call, ImagePrediction, Model};
use ortserve_core::codec::{JsonError, Reader};
use ortserve_core::config::ImageConfig;
use ortserve_core::model::ModelInfo;
use ortserve_core::tensor::Tensor;

#[derive(Debug, Default, Deserialize)]
pub(crate) struct PredictQuery {
    /// Add each image's raw output next to its labels.
    #[serde(default)]
    raw: bool,
}

/// What a syntax error in a predict body starts with.
const EXPECTED: &str = "expected {\"instances\": [...]}";

/// The body as the parser first sees it: `instances` stays text (no JSON tree is built), to be
/// read as images or straight into tensor bytes.
#[derive(Deserialize)]
struct PredictBody<'a> {
    #[serde(borrow)]
    instances: &'a RawValue,
    #[serde(default)]
    raw: bool,
}

pub(crate) async fn predict(
    State(app): State<Arc<AppState>>,
    Path(target): Path<String>,
    Query(query): Query<PredictQuery>,
    req: Request,
) -> Response {
    let started = Instant::now();
    let Some(model) = target.strip_suffix(":predict").map(str::to_string) else {
        return ApiError(CallError::NotFound(format!(
            "no route /v1/models/{target}; use /v1/models/{{model}}:predict"
        )))
        .into_response();
    };
    let response = run(&app, &model, query, req)
        .await
        .unwrap_or_else(|e| ApiError(e).into_response());
    super::record(&app, &model, "v1_predict", &response, started);
    response
}

async fn run(
    app: &AppState,
    model: &str,
    query: PredictQuery,
    req: Request,
) -> Result<Response, CallError> {
    let m = lookup(app, model, None)?;
    let call = extract::call(req.headers())?;
    let image = m.image();
    let ctype = extract::content_type(req.headers());
    match (ctype.as_deref(), &image) {
        (Some("multipart/form-data"), Some(cfg)) => {
            // Read like every other body (limit, deadline, body memory), then parsed.
            let (parts, body) = req.into_parts();
            let (bytes, _held) = read_body(app, &parts.headers, body, &call).await?;
            let images = multipart_images(cfg, Request::from_parts(parts, Body::from(bytes))).await?;
            predict_images(app, &m, images, query.raw, &call).await
        }
        (Some(t), Some(cfg)) if t.starts_with("image/") => {
            if !matches!(t, "image/jpeg" | "image/jpg" | "image/png" | "image/webp" | "image/gif" | "image/bmp") {
                return Err(CallError::UnsupportedMediaType(format!(
                    "{t} is not accepted; send image/jpeg, image/png, image/webp, image/gif or image/bmp"
                )));
            }
            let (parts, body) = req.into_parts();
            let (body, _held) = read_limited(app, &parts.headers, body, cfg.max_image_bytes.0, &call).await?;
            predict_images(app, &m, vec![body], query.raw, &call).await
        }
        (None | Some("application/json" | "text/plain" | "application/x-www-form-urlencoded"), _) => {
            let (parts, body) = req.into_parts();
            let (bytes, _held) = read_body(app, &parts.headers, body, &call).await?;
            match image {
                Some(cfg) => {
                    let cfg = cfg.clone();
                    let (images, raw) = extract::decode(app, &call, bytes.len(), move || b64_instances(&cfg, &bytes)).await?;
                    predict_images(app, &m, images, query.raw || raw, &call).await
                }
                None => {
                    let (info, name, max) = (m.info().clone(), m.name().to_string(), m.max_rows());
                    let (named, n) = extract::decode(app, &call, bytes.len(), move || tensor_instances(&info, &name, max, &bytes)).await?;
                    predict_tensors(&m, named, n, &call).await
                }
            }
        }
        (Some(t), _) => Err(CallError::UnsupportedMediaType(match image {
            Some(_) => format!("{t} is not accepted; send multipart/form-data with image parts, an image/* body, or JSON instances"),
            None => format!("{t} is not accepted; model {model:?} takes JSON {{\"instances\": [...]}}"),
        })),
    }
}

/// Reads a body of at most `limit` bytes (and the server's body limit).
async fn read_limited<'a>(
    app: &'a AppState,
    headers: &axum::http::HeaderMap,
    body: Body,
    limit: u64,
    call: &Call,
) -> Result<(Bytes, extract::BodyMemory<'a>), CallError> {
    let (bytes, held) = read_body(app, headers, body, call).await?;
    if bytes.len() as u64 > limit {
        return Err(CallError::ImageTooLarge(format!(
            "the image has {} bytes; the limit is {limit}",
            bytes.len()
        )));
    }
    Ok((bytes, held))
}

/// The body's `instances` as a list of raw JSON texts, and its `raw` flag. More than `max`
/// instances is refused with `too_many(max)` as soon as the parser reaches one more, so a big
/// list costs no more than `max` entries.
fn instances(
    body: &[u8],
    max: usize,
    too_many: impl FnOnce(usize) -> CallError,
) -> Result<(&RawValue, Vec<&RawValue>, bool), CallError> {
    let expected = |e: serde_json::Error| CallError::MalformedBody(format!("{EXPECTED}: {e}"));
    let body: PredictBody = serde_json::from_slice(body).map_err(expected)?;
    let over = std::cell::Cell::new(false);
    let mut parser = serde_json::Deserializer::from_str(body.instances.get());
    let list = serde::de::DeserializeSeed::deserialize(AtMost { max, over: &over }, &mut parser);
    if over.get() {
        return Err(too_many(max));
    }
    let list = list.map_err(expected)?;
    if list.is_empty() {
        return Err(CallError::MalformedBody("`instances` is empty".into()));
    }
    Ok((body.instances, list, body.raw))
}

/// A JSON array's elements as raw texts, at most `max` of them (`over` is set past that).
struct AtMost<'c> {
    max: usize,
    over: &'c std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for AtMost<'_> {
    type Value = Vec<&'de RawValue>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for AtMost<'_> {
    type Value = Vec<&'de RawValue>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut list = Vec::new();
        while let Some(item) = seq.next_element::<&'de RawValue>()? {
            if list.len() == self.max {
                self.over.set(true);
                return Err(serde::de::Error::custom("too many instances"));
            }
            list.push(item);
        }
        Ok(list)
    }
}

async fn multipart_images(cfg: &ImageConfig, req: Request) -> Result<Vec<Bytes>, CallError> {
    let multipart_error = |e: axum::extract::multipart::MultipartError| {
        CallError::MalformedBody(format!("multipart body: {}", e.body_text()))
    };
    let mut form = Multipart::from_request(req, &())
        .await
        .map_err(|e| CallError::MalformedBody(format!("multipart body: {e}")))?;
    let mut images = Vec::new();
    while let Some(mut field) = form.next_field().await.map_err(multipart_error)? {
        if field.name() != Some("image") {
            continue;
        }
        if images.len() == cfg.max_images {
            return Err(CallError::ImageTooLarge(format!(
                "more than {} images in one request",
                cfg.max_images
            )));
        }
        let mut data = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
            if (data.len() + chunk.len()) as u64 > cfg.max_image_bytes.0 {
                return Err(CallError::ImageTooLarge(format!(
                    "image {} is larger than the limit of {} bytes",
                    images.len(),
                    cfg.max_image_bytes.0
                )));
            }
            data.extend_from_slice(&chunk);
        }
        images.push(Bytes::from(data));
    }
    if images.is_empty() {
        return Err(CallError::MalformedBody(
            "the multipart body has no `image` part".into(),
        ));
    }
    Ok(images)
}

/// `{"instances": [{"b64": "..."}, ...]}`: the decoded image bytes, and the `raw` flag.
fn b64_instances(cfg: &ImageConfig, body: &[u8]) -> Result<(Vec<Bytes>, bool), CallError> {
    #[derive(Deserialize)]
    struct B64<'a> {
        #[serde(borrow)]
        b64: std::borrow::Cow<'a, str>,
    }
    let (_, list, raw) = instances(body, cfg.max_images, |max| {
        CallError::ImageTooLarge(format!("more than {max} images in one request"))
    })?;
    let images = list
        .iter()
        .enumerate()
        .map(|(i, inst)| {
            let text = serde_json::from_str::<B64>(inst.get())
                .map_err(|_| {
                    CallError::MalformedBody(format!(
                        "instance {i}: an image model takes {{\"b64\": \"<base64 image>\"}}"
                    ))
                })?
                .b64;
            // Base64 is 4/3 of the bytes: refuse before decoding what would be too large.
            if text.len() as u64 / 4 * 3 > cfg.max_image_bytes.0 + 3 {
                return Err(CallError::ImageTooLarge(format!(
                    "instance {i}: the image is larger than the limit of {} bytes",
                    cfg.max_image_bytes.0
                )));
            }
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map(Bytes::from)
                .map_err(|e| CallError::MalformedBody(format!("instance {i}: invalid base64: {e}")))
        })
        .collect::<Result<_, _>>()?;
    Ok((images, raw))
}

/// Images through the core (preprocessing, batching, classification), answered as
/// TF-Serving predictions: each image's `classes`, and its raw output by name when asked for.
async fn predict_images(
    app: &AppState,
    m: &Model,
    images: Vec<Bytes>,
    raw: bool,
    call: &Call,
) -> Result<Response, CallError> {
    let predictions: Vec<Value> = app
        .predict_images(m, images, raw, call)
        .await?
        .into_iter()
        .map(|ImagePrediction { classes, output }| {
            let mut p = Map::new();
            if let Some(classes) = classes {
                p.insert("classes".into(), json!(classes));
            }
            if let Some((name, row)) = output {
                p.insert(name, nested(&row));
            }
            Value::Object(p)
        })
        .collect();
    Ok(Json(
        json!({"model_name": m.name(), "model_version": m.version(), "predictions": predictions}),
    )
    .into_response())
}

/// One row's values (dim 0 dropped) as nested JSON arrays.
fn nested(row: &Tensor) -> Value {
    let flat = match serde_json::to_value(v2::JsonData(row)) {
        Ok(Value::Array(v)) => v,
        _ => Vec::new(),
    };
    fn build(values: &[Value], dims: &[usize]) -> Value {
        match dims.split_first() {
            None => values.first().cloned().unwrap_or(Value::Null),
            Some((_, [])) => Value::Array(values.to_vec()),
            Some((&n, rest)) => {
                let step = values.len() / n.max(1);
                Value::Array(
                    (0..n)
                        .map(|i| build(&values[i * step..(i + 1) * step], rest))
                        .collect(),
                )
            }
        }
    }
    build(&flat, row.shape.get(1..).unwrap_or_default())
}

/// Instances of a tensor model, one row each, straight from their text into tensor bytes: the
/// rows themselves when the model has one input, else an object by input name per row.
fn tensor_instances(
    info: &ModelInfo,
    model: &str,
    max_rows: usize,
    body: &[u8],
) -> Result<Rows, CallError> {
    if let [input] = info.inputs.as_slice() {
        if let Some(rows) = one_input_rows(input, model, max_rows, body)? {
            return Ok(rows);
        }
    }
    let (all, list, _) = instances(body, max_rows, too_many_rows)?;
    let n = list.len();
    let objects: Option<Vec<BTreeMap<String, &RawValue>>> = if info.inputs.len() == 1
        && !list.iter().any(|r| r.get().starts_with('{'))
    {
        None
    } else {
        Some(
            list.iter()
                .enumerate()
                .map(|(i, r)| {
                    serde_json::from_str(r.get()).map_err(|_| {
                        CallError::MalformedBody(format!(
                            "instance {i}: the model has several inputs; send an object by input name"
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
        )
    };
    let mut named = Vec::with_capacity(info.inputs.len());
    for input in &info.inputs {
        let mut shape = vec![n];
        shape.extend(row_shape(input, model)?);
        let what = format!("input {:?}", input.name);
        let data = match &objects {
            None => v2::json_data_text(all.get(), input.dtype, &shape, &what)?,
            Some(rows) => {
                let mut text = String::from("[");
                for (i, row) in rows.iter().enumerate() {
                    let v = row.get(&input.name).ok_or_else(|| {
                        CallError::InvalidInput(format!(
                            "instance {i} has no input {:?}",
                            input.name
                        ))
                    })?;
                    if i > 0 {
                        text.push(',');
                    }
                    text.push_str(v.get());
                }
                text.push(']');
                v2::json_data_text(&text, input.dtype, &shape, &what)?
            }
        };
        let t = Tensor::new(input.dtype, shape, data)
            .map_err(|e| CallError::InvalidInput(e.to_string()))?;
        named.push((input.name.clone(), t));
    }
    Ok((named, n))
}

/// Named input tensors and how many rows they hold.
type Rows = (Vec<(String, Tensor)>, usize);

/// More instances than a tensor model takes in one request.
fn too_many_rows(max: usize) -> CallError {
    CallError::InvalidInput(format!(
        "the request has more than {max} instances; this model takes at most {max} rows per request"
    ))
}

/// The dims of one row of `input` (all but the first), which must be fixed.
fn row_shape(
    input: &ortserve_core::model::TensorInfo,
    model: &str,
) -> Result<Vec<usize>, CallError> {
    let rest = input.dims.get(1..).unwrap_or_default();
    if rest.iter().any(|&d| d < 0) {
        return Err(CallError::InvalidInput(format!(
            "input {:?} has dynamic dims {:?}; send it through /v2/models/{model}/infer with a shape",
            input.name, input.dims
        )));
    }
    Ok(rest.iter().map(|&d| d as usize).collect())
}

/// The common case of a one-input model whose instances are its rows: read in one pass, straight
/// into the tensor's bytes. `None` when the instances are objects by input name (read by
/// [`tensor_instances`]' general path).
fn one_input_rows(
    input: &ortserve_core::model::TensorInfo,
    model: &str,
    max_rows: usize,
    body: &[u8],
) -> Result<Option<Rows>, CallError> {
    let rest = row_shape(input, model)?;
    let what = format!("input {:?}", input.name);
    let mut r = Reader::new(body, EXPECTED);
    let mut rows = None;
    let mut objects = false;
    r.object(|r, key| {
        match &*key {
            "instances" => {
                if rows.is_some() || objects {
                    return Err(r.error(r.position(), "duplicate field `instances`"));
                }
                if r.peek() != Some(b'[') {
                    return Err(r.error(r.position(), "invalid type: expected an array"));
                }
                if r.at(r.position() + 1).peek() == Some(b'{') {
                    objects = true;
                    r.skip()?;
                } else {
                    rows = Some(r.tensor_rows(input.dtype, &rest, max_rows, &what)?);
                }
            }
            "raw" => {
                r.value::<bool>()?;
            }
            _ => r.ignore()?,
        }
        Ok(())
    })
    .map_err(|e| match e {
        JsonError::TooManyRows { max } => too_many_rows(max),
        e => e.into(),
    })?;
    r.end()?;
    if objects {
        return Ok(None);
    }
    let Some((data, n)) = rows else {
        return Err(CallError::MalformedBody(format!(
            "{EXPECTED}: missing field `instances`"
        )));
    };
    if n == 0 {
        return Err(CallError::MalformedBody("`instances` is empty".into()));
    }
    let mut shape = vec![n];
    shape.extend(rest);
    let t = Tensor::new(input.dtype, shape, data)
        .map_err(|e| CallError::InvalidInput(e.to_string()))?;
    Ok(Some((vec![(input.name.clone(), t)], n)))
}

/// Runs a tensor model's instances and answers TF-Serving predictions.
async fn predict_tensors(
    m: &Model,
    named: Vec<(String, Tensor)>,
    n: usize,
    call: &Call,
) -> Result<Response, CallError> {
    let info = m.info();
    let outputs = m.infer(named, call).await?;
    let predictions: Vec<Value> = (0..n)
        .map(|i| {
            if outputs.len() == 1 {
                nested(&outputs[0].slice_rows(i, 1))
            } else {
                Value::Object(
                    info.outputs
                        .iter()
                        .zip(&outputs)
                        .map(|(o, t)| (o.name.clone(), nested(&t.slice_rows(i, 1))))
                        .collect(),
                )
            }
        })
        .collect();
    Ok(Json(json!({"predictions": predictions})).into_response())
}
