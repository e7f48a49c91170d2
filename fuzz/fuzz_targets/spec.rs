//! Fuzzes the job-spec file parser and the validator: any text must give a spec that passes
//! validation or an error, never a panic; an accepted spec must survive its round trip.

#![no_main]

use berth_model::spec::{JobSpecFile, Limits, parse_and_validate, validate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = parse_and_validate(text) {
        let again = JobSpecFile::from_proto(&spec)
            .to_proto()
            .expect("an accepted spec converts back");
        assert_eq!(again, spec, "round trip changed an accepted spec");
        assert!(validate(&again, &Limits::default()).is_ok());
    }
});
