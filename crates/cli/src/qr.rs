//! QR codes of a config: in the terminal (two modules per character cell) and as a PNG.

use std::io::Write;

use anyhow::{Context, Result};
use qrcode::render::unicode::Dense1x2;
use qrcode::{Color, EcLevel, QrCode};

/// Pixels per module in the PNG.
const PNG_SCALE: usize = 8;
/// Modules of light border around the code, as the standard asks.
const QUIET_ZONE: usize = 4;

fn code(text: &str) -> Result<QrCode> {
    // Level L holds the most data: a config with a handful of peers still fits.
    QrCode::with_error_correction_level(text.as_bytes(), EcLevel::L)
        .context("the config is too large for a QR code")
}

/// The code as text for a dark terminal: light modules are drawn, dark ones left blank.
pub fn terminal(text: &str) -> Result<String> {
    Ok(code(text)?
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

/// The code as an 8-bit greyscale PNG.
pub fn png(text: &str, out: impl Write) -> Result<()> {
    let code = code(text)?;
    let modules = code.width();
    let colors = code.to_colors();
    let side = (modules + 2 * QUIET_ZONE) * PNG_SCALE;
    let mut pixels = vec![255u8; side * side];
    for (i, c) in colors.iter().enumerate() {
        if *c != Color::Dark {
            continue;
        }
        let (mx, my) = (i % modules + QUIET_ZONE, i / modules + QUIET_ZONE);
        for y in my * PNG_SCALE..(my + 1) * PNG_SCALE {
            pixels[y * side + mx * PNG_SCALE..y * side + (mx + 1) * PNG_SCALE].fill(0);
        }
    }
    let mut encoder = png::Encoder::new(out, side as u32, side as u32);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&pixels)?;
    writer.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "[Interface]\nPrivateKey = CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=\n\
        Address = 10.250.1.5/32\n\n# node a\n[Peer]\n\
        PublicKey = AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n\
        AllowedIPs = 10.96.0.0/16, 10.244.1.0/24, 10.250.0.1/32\n\
        Endpoint = 192.168.0.1:51820\nPersistentKeepalive = 25\n";

    fn decode(width: usize, height: usize, dark: impl Fn(usize, usize) -> bool) -> String {
        let mut img = rqrr::PreparedImage::prepare_from_greyscale(width, height, |x, y| {
            if dark(x, y) { 0 } else { 255 }
        });
        let grids = img.detect_grids();
        assert_eq!(grids.len(), 1, "one QR code in the picture");
        grids[0].decode().expect("the code decodes").1
    }

    #[test]
    fn png_decodes_back_to_the_config() {
        let mut buf = Vec::new();
        png(CONFIG, &mut buf).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(buf));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!(info.color_type, png::ColorType::Grayscale);
        let w = info.width as usize;
        let text = decode(w, info.height as usize, |x, y| pixels[y * w + x] < 128);
        assert_eq!(text, CONFIG);
    }

    #[test]
    fn terminal_code_decodes_back_to_the_config() {
        let art = terminal(CONFIG).unwrap();
        // Each character is two modules stacked; blank means dark (drawn for dark terminals).
        let rows: Vec<Vec<char>> = art.lines().map(|l| l.chars().collect()).collect();
        let cols = rows[0].len();
        assert!(rows.iter().all(|r| r.len() == cols), "a rectangle");
        let light = |c: char, upper: bool| match c {
            '\u{2588}' => true,
            '\u{2580}' => upper,
            '\u{2584}' => !upper,
            ' ' => false,
            other => panic!("unexpected character {other:?}"),
        };
        const SCALE: usize = 6;
        let text = decode(cols * SCALE, rows.len() * 2 * SCALE, |x, y| {
            let (mx, my) = (x / SCALE, y / SCALE);
            !light(rows[my / 2][mx], my % 2 == 0)
        });
        assert_eq!(text, CONFIG);
    }
}
