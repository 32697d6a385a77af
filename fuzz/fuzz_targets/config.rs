//! Fuzzes the config parser: `Config::parse` never panics on any text, and every error it
//! returns says what is wrong (a non-empty message; the path may be empty only for
//! whole-file problems such as YAML syntax).
#![no_main]

use l3lb::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The agent reads configs with `read_to_string`, which rejects non-UTF-8 before the
    // parser sees it.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::parse(text) {
        assert!(
            !e.message.trim().is_empty(),
            "error without a message (path {:?}) for {text:?}",
            e.path
        );
        let shown = e.to_string();
        assert!(
            shown.ends_with(&e.message),
            "displayed error {shown:?} drops its message"
        );
    }
});
