//! Editing pod JSON in place: the template is kept as JSON so fields this program does not know
//! survive, and these make sure a nested object or array is there to write into.

use serde_json::{Map, Value, json};

/// `m[key]` as an object, made one (replacing anything else there) if it is not.
pub fn object<'m>(m: &'m mut Map<String, Value>, key: &str) -> &'m mut Map<String, Value> {
    let slot = m.entry(key).or_insert_with(|| json!({}));
    if !slot.is_object() {
        *slot = json!({});
    }
    match slot {
        Value::Object(inner) => inner,
        _ => unreachable!("just made an object"),
    }
}

/// `m[key]` as an array, made one (replacing anything else there) if it is not.
pub fn array<'m>(m: &'m mut Map<String, Value>, key: &str) -> &'m mut Vec<Value> {
    let slot = m.entry(key).or_insert_with(|| json!([]));
    if !slot.is_array() {
        *slot = json!([]);
    }
    match slot {
        Value::Array(inner) => inner,
        _ => unreachable!("just made an array"),
    }
}
