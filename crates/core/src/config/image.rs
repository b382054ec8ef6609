//! The `image` and `classification` keys: how uploaded images become a model input, and how
//! outputs become labels.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, ByteSize, ConfigError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Nearest,
    #[default]
    Bilinear,
    Bicubic,
    Lanczos3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    #[default]
    Rgb,
    Bgr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    #[default]
    Nchw,
    Nhwc,
}

/// Element type of the image tensor the model takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ImageDtype {
    /// (pixel − mean) / std as float32.
    #[default]
    Fp32,
    /// Raw 0..255 pixels (mean and std must be left at 0 and 1).
    Uint8,
}

/// Preprocessing of one uploaded image into one row of the model's input.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// `[height, width]` of the model input.
    pub size: [u32; 2],
    /// Resize so the shorter side is this long, then crop the centre to `size`. Unset: resize
    /// straight to `size` (aspect ratio not kept).
    #[serde(default)]
    pub resize_shorter: Option<u32>,
    #[serde(default)]
    pub interpolation: Interpolation,
    /// Per channel, in `channel_order`: value = (pixel − mean) / std.
    #[serde(default = "zeros")]
    pub mean: [f32; 3],
    #[serde(default = "ones")]
    pub std: [f32; 3],
    #[serde(default)]
    pub channel_order: ChannelOrder,
    #[serde(default)]
    pub layout: Layout,
    #[serde(default)]
    pub dtype: ImageDtype,
    /// Largest encoded image accepted (413 above).
    #[serde(default = "default_image_bytes")]
    pub max_image_bytes: ByteSize,
    /// Largest width × height accepted, checked from the header before decoding, and again for
    /// the frame after `resize_shorter` before it is allocated (a 1 × 100,000 strip scaled to a
    /// shorter side of 256 would be 25.6 M pixels). 413 above.
    #[serde(default = "default_pixels")]
    pub max_pixels: u64,
    /// Most images in one request (413 above).
    #[serde(default = "default_images")]
    pub max_images: usize,
    /// Most pixels (width × height, from the headers) of all the images of one request
    /// together, which bounds the decoding work one request can ask for (413 above).
    #[serde(default = "default_request_pixels")]
    pub max_request_pixels: u64,
}

fn zeros() -> [f32; 3] {
    [0.0; 3]
}
fn ones() -> [f32; 3] {
    [1.0; 3]
}
fn default_image_bytes() -> ByteSize {
    ByteSize(10 << 20)
}
fn default_pixels() -> u64 {
    40_000_000
}
fn default_images() -> usize {
    32
}
fn default_request_pixels() -> u64 {
    64_000_000
}

/// Turning a model's scores into labels.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClassificationConfig {
    /// Class names, one per line, in output index order.
    #[serde(default)]
    pub labels: Option<PathBuf>,
    /// Apply softmax first (the model outputs logits).
    #[serde(default = "yes")]
    pub softmax: bool,
    /// How many classes to return per image.
    #[serde(default = "five")]
    pub top_k: usize,
    /// Output to read scores from; default: the first output.
    #[serde(default)]
    pub output: Option<String>,
}

fn yes() -> bool {
    true
}
fn five() -> usize {
    5
}

impl ImageConfig {
    /// A config for `[height, width]` with every other key at its default (no normalization,
    /// plain resize, RGB, NCHW, float32).
    pub fn new(size: [u32; 2]) -> ImageConfig {
        ImageConfig {
            size,
            resize_shorter: None,
            interpolation: Interpolation::default(),
            mean: zeros(),
            std: ones(),
            channel_order: ChannelOrder::default(),
            layout: Layout::default(),
            dtype: ImageDtype::default(),
            max_image_bytes: default_image_bytes(),
            max_pixels: default_pixels(),
            max_images: default_images(),
            max_request_pixels: default_request_pixels(),
        }
    }

    pub(super) fn validate(&self, key: &str) -> Result<(), ConfigError> {
        let [h, w] = self.size;
        if h == 0 || w == 0 || h > 8192 || w > 8192 {
            return Err(invalid(
                format!("{key}.size"),
                format!(
                    "must be [height, width] within 1..=8192, got {:?}",
                    self.size
                ),
            ));
        }
        if let Some(s) = self.resize_shorter {
            if s < h.max(w) || s > 16384 {
                return Err(invalid(
                    format!("{key}.resize_shorter"),
                    format!(
                        "must be at least the larger of size ({}) and at most 16384, got {s}",
                        h.max(w)
                    ),
                ));
            }
        }
        if self.std.iter().any(|&s| s == 0.0 || !s.is_finite())
            || self.mean.iter().any(|m| !m.is_finite())
        {
            return Err(invalid(
                format!("{key}.std"),
                "std must be finite and non-zero, mean finite",
            ));
        }
        if self.dtype == ImageDtype::Uint8 && (self.mean != zeros() || self.std != ones()) {
            return Err(invalid(
                format!("{key}.dtype"),
                "uint8 inputs take raw pixels: leave mean at 0 and std at 1",
            ));
        }
        if self.max_pixels == 0
            || self.max_images == 0
            || self.max_image_bytes.0 == 0
            || self.max_request_pixels == 0
        {
            return Err(invalid(
                key,
                "max_pixels, max_request_pixels, max_images and max_image_bytes must be at least 1",
            ));
        }
        Ok(())
    }
}

impl ClassificationConfig {
    pub(super) fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.top_k == 0 || self.top_k > 1000 {
            return Err(invalid(
                format!("{key}.top_k"),
                format!("must be 1..=1000, got {}", self.top_k),
            ));
        }
        if let Some(p) = &self.labels {
            if !p.is_file() {
                return Err(invalid(
                    format!("{key}.labels"),
                    format!("no labels file at {}", p.display()),
                ));
            }
        }
        Ok(())
    }
}
