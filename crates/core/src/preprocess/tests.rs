use std::io::Cursor;

use image::{ImageFormat, Rgb, RgbImage};

use super::*;
use crate::config::ByteSize;

fn cfg() -> ImageConfig {
    ImageConfig {
        resize_shorter: Some(32),
        mean: [127.0; 3],
        std: [128.0; 3],
        max_image_bytes: ByteSize(1 << 20),
        max_pixels: 1_000_000,
        max_images: 8,
        ..ImageConfig::new([24, 24])
    }
}

/// A 60 × 45 image with smooth gradients and some texture.
fn photo() -> RgbImage {
    RgbImage::from_fn(60, 45, |x, y| {
        Rgb([(x * 4) as u8, (y * 5) as u8, ((x * y) % 251) as u8])
    })
}

fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

#[test]
fn layouts_channel_orders_and_uint8() {
    let img = RgbImage::from_fn(24, 24, |x, y| Rgb([x as u8, y as u8, 200]));
    let mut c = cfg();
    c.resize_shorter = None;
    c.layout = Layout::Nhwc;
    c.channel_order = ChannelOrder::Bgr;
    c.dtype = ImageDtype::Uint8;
    c.mean = [0.0; 3];
    c.std = [1.0; 3];
    let t = preprocess(&encode(&img, ImageFormat::Png), &c).unwrap();
    assert_eq!(
        (t.dtype, t.shape.clone()),
        (DataType::U8, vec![1, 24, 24, 3])
    );
    // Pixel (x=5, y=7) in BGR.
    let at = (7 * 24 + 5) * 3;
    assert_eq!(&t.data[at..at + 3], &[200, 7, 5]);
}

/// A PNG chunk with its CRC.
fn chunk(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    let mut typed = kind.to_vec();
    typed.extend_from_slice(body);
    out.extend_from_slice(&typed);
    out.extend_from_slice(&crc32(&typed).to_be_bytes());
    out
}

#[test]
fn exif_orientation_is_applied() {
    // 40 wide, 20 high; orientation 6 means "rotate 90° clockwise to display".
    let png = encode(
        &RgbImage::from_fn(40, 20, |x, _| Rgb([x as u8 * 6, 0, 0])),
        ImageFormat::Png,
    );
    // TIFF header (little endian), one IFD entry: tag 0x0112 (Orientation), SHORT, 1 value, 6.
    let mut exif = b"II*\x00\x08\x00\x00\x00\x01\x00".to_vec();
    exif.extend_from_slice(&[0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0]);
    let idat = png.windows(4).position(|w| w == b"IDAT").unwrap() - 4;
    let mut with_exif = png[..idat].to_vec();
    with_exif.extend(chunk(b"eXIf", &exif));
    with_exif.extend_from_slice(&png[idat..]);
    let mut c = cfg();
    c.resize_shorter = None;
    c.size = [40, 20];
    c.dtype = ImageDtype::Uint8;
    assert_eq!(decode(&with_exif, &c).unwrap().dimensions(), (20, 40));
    let t = preprocess(&with_exif, &c).unwrap();
    assert_eq!(t.shape, vec![1, 3, 40, 20], "rotated to portrait");
    // The left column (x = 0, red 0) is now the top row.
    let red = |x: usize, y: usize| t.data[y * 20 + x];
    assert_eq!((red(10, 0), red(10, 39)), (0, 39 * 6));
}

#[test]
fn every_pixel_format_is_resized_as_rgb_would_be() {
    // Grey, grey with alpha and RGBA are resized in their own format and converted afterwards;
    // the rows match converting to RGB first (alpha dropped, not premultiplied).
    let rgb = photo();
    let rgba = image::RgbaImage::from_fn(60, 45, |x, y| {
        let p = rgb.get_pixel(x, y).0;
        image::Rgba([p[0], p[1], p[2], ((x * 17 + y) % 256) as u8])
    });
    let grey = DynamicImage::ImageRgb8(rgb.clone()).into_luma8();
    let grey_alpha = DynamicImage::ImageRgba8(rgba.clone()).into_luma_alpha8();
    let cases: [(&str, DynamicImage); 3] = [
        ("rgba", rgba.into()),
        ("grey", grey.into()),
        ("grey+alpha", grey_alpha.into()),
    ];
    for (name, img) in cases {
        let mut bytes = Cursor::new(Vec::new());
        img.write_to(&mut bytes, ImageFormat::Png).unwrap();
        let got = preprocess(bytes.get_ref(), &cfg()).unwrap().to_f32();
        let want = preprocess(&encode(&img.to_rgb8(), ImageFormat::Png), &cfg())
            .unwrap()
            .to_f32();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1.0 / 128.0 + 1e-6,
            "{name}: largest difference {worst}"
        );
    }
}

#[test]
fn a_request_is_checked_from_its_headers_before_any_image_is_decoded() {
    let mut c = cfg();
    c.max_request_pixels = 3000;
    let fine = encode(&photo(), ImageFormat::Png); // 2700 pixels
    let truncated = &fine[..fine.len() / 2];
    // The first image's pixels are cut short, but the second one's header already puts the
    // request over its budget: refused as too large, naming the second image, nothing decoded.
    let err = check_request(&[truncated, &fine], &c).unwrap_err();
    assert!(
        matches!(&err, (1, PreprocessError::TooLarge(m)) if m.contains("max_request_pixels")),
        "{err:?}"
    );
    assert_eq!(
        check_request(&[&fine[..], b"not an image"], &c).unwrap_err(),
        (1, PreprocessError::NotAnImage)
    );
    check_request(&[&fine], &c).unwrap();
}

#[test]
fn bad_images_are_refused() {
    let c = cfg();
    let png = encode(&photo(), ImageFormat::Png);
    assert_eq!(decode(&[], &c).unwrap_err(), PreprocessError::Empty);
    assert_eq!(
        decode(b"hello, not an image", &c).unwrap_err(),
        PreprocessError::NotAnImage
    );
    assert!(matches!(
        decode(&png[..png.len() / 2], &c),
        Err(PreprocessError::Corrupt(_))
    ));
    let mut garbled = png.clone();
    for b in &mut garbled[60..200] {
        *b ^= 0x5a;
    }
    assert!(matches!(
        decode(&garbled, &c),
        Err(PreprocessError::Corrupt(_))
    ));
    let mut small = c.clone();
    small.max_image_bytes = ByteSize(100);
    assert!(
        matches!(decode(&png, &small), Err(PreprocessError::TooLarge(m)) if m.contains("bytes"))
    );
}

/// A valid PNG header declaring `w` × `h` pixels, followed by a tiny compressed stream.
pub(crate) fn bomb_png(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    out.extend(chunk(b"IHDR", &ihdr));
    out.extend(chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01],
    ));
    out.extend(chunk(b"IEND", &[]));
    out
}

#[test]
fn a_decompression_bomb_is_refused_from_its_header() {
    let bomb = bomb_png(50_000, 50_000);
    assert!(bomb.len() < 100);
    let before = crate::tuning::process_rss().unwrap();
    let err = decode(&bomb, &cfg()).unwrap_err();
    let after = crate::tuning::process_rss().unwrap();
    assert!(
        matches!(&err, PreprocessError::TooLarge(m) if m.contains("50000 × 50000")),
        "{err:?}"
    );
    assert!(
        after < before + (64 << 20),
        "decoding allocated {} bytes",
        after - before
    );
}
