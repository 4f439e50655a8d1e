//! Any bytes, read as (lossy) UTF-8: `parse` must not panic, and whatever it accepts must
//! survive `render` unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wgmesh_core::wgquick::{parse, render};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(cfg) = parse(&text) {
        let rendered = render(&cfg);
        match parse(&rendered) {
            Ok(back) => assert_eq!(back, cfg, "round trip changed the config:\n{rendered}"),
            Err(e) => panic!("rendered config does not parse: {e}\n{rendered}"),
        }
        assert_eq!(render(&cfg), rendered, "render is not deterministic");
    }
});
