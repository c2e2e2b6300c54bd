//! An SMSC's `short_message` octets: any bytes, under any `data_coding` and `esm_class`, decode
//! to a text or an error, never a panic; and any text encodes into parts that decode back to it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u8, u8, bool, &[u8], &str)| {
    let (data_coding, esm_class, packed, octets, text) = input;
    let _ = gateway::sms_wire::decode(data_coding, esm_class, octets, packed);

    // Packed GSM-7 reads a part's final carriage return on an octet boundary as padding
    // (sms_wire's module docs), so the round trip is checked without carriage returns.
    let text = text.replace('\r', "");
    let sms = gateway::sms::SmsText::new(text.clone());
    if sms.segments() > 255 {
        return;
    }
    let coding = gateway::sms_wire::Coding {
        gsm7_packed: packed,
        ..gateway::sms_wire::Coding::default()
    };
    let mut whole = String::new();
    for part in gateway::sms_wire::encode(&sms, &coding, 7) {
        let decoded = gateway::sms_wire::decode(
            part.data_coding,
            part.esm_class,
            &part.short_message,
            packed,
        )
        .expect("an encoded part decodes");
        whole.push_str(&decoded.text);
    }
    assert_eq!(whole, text);
});
