//! Kubernetes' protobuf request bodies, turned into the JSON objects the rest of the server
//! handles. kubectl's typed clients (`create configmap/secret/namespace/deployment/...`,
//! `drain`'s evictions) send `application/vnd.kubernetes.protobuf`: the magic `k8s\0`, then a
//! `runtime.Unknown` holding the type and the object's own protobuf bytes.
//!
//! The decoder is driven by a table of message layouts ([`schema`], from `schema.txt`), so a
//! type is added by describing it, not by writing code. A field the table does not know is
//! refused rather than dropped: nothing the client sent is silently lost.

pub(crate) mod schema;

use base64::Engine as _;
use serde_json::{Map, Value, json};

use crate::status::ApiError;
use schema::{Field, Message, Type};

/// The content type kubectl's typed clients use for request bodies.
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";

const MAGIC: &[u8] = b"k8s\0";

/// Decodes a `k8s\0`-prefixed `runtime.Unknown` into the object's JSON form, with its
/// `apiVersion` and `kind`.
pub fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let envelope = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| bad("the protobuf body does not start with the Kubernetes magic number"))?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), None);
    let mut r = Reader::new(envelope);
    while let Some((num, wire)) = r.tag()? {
        match (num, wire) {
            (1, Wire::Len) => {
                let mut meta = Reader::new(r.bytes()?);
                while let Some((n, w)) = meta.tag()? {
                    match (n, w) {
                        (1, Wire::Len) => api_version = meta.string()?,
                        (2, Wire::Len) => kind = meta.string()?,
                        _ => meta.skip(w)?,
                    }
                }
            }
            (2, Wire::Len) => raw = Some(r.bytes()?),
            (3 | 4, Wire::Len) => {
                let value = r.string()?;
                if !value.is_empty() && num == 3 {
                    return Err(bad(&format!("protobuf content encoding {value:?} is not supported")));
                }
            }
            _ => r.skip(wire)?,
        }
    }
    let message = schema::message(&kind).ok_or_else(|| {
        ApiError::UnsupportedMediaType(format!("application/json ({kind} is not decoded from protobuf)"))
    })?;
    let mut object = Map::new();
    object.insert("apiVersion".into(), json!(api_version));
    object.insert("kind".into(), json!(kind));
    object.extend(decode_message(raw.unwrap_or_default(), message)?);
    Ok(Value::Object(object))
}

fn bad(msg: &str) -> ApiError {
    ApiError::BadRequest(msg.to_string())
}

fn decode_message(bytes: &[u8], message: &Message) -> Result<Map<String, Value>, ApiError> {
    let mut out = Map::new();
    let mut r = Reader::new(bytes);
    while let Some((num, wire)) = r.tag()? {
        let field = message.field(num).ok_or_else(|| {
            bad(&format!("field {num} of {} is not known to this server: send the object as JSON", message.name))
        })?;
        if field.repeated && wire == Wire::Len && field.ty.is_varint() {
            // A packed repeated number.
            let mut packed = Reader::new(r.bytes()?);
            while !packed.done() {
                let v = scalar_varint(&field.ty, packed.varint()?);
                push(&mut out, field, v);
            }
            continue;
        }
        if let (Type::Map(value_ty), Wire::Len) = (&field.ty, wire) {
            let (key, value) = decode_entry(r.bytes()?, value_ty)?;
            let map = out.entry(field.name.clone()).or_insert_with(|| json!({}));
            map.as_object_mut().expect("maps are objects").insert(key, value);
            continue;
        }
        let value =
            decode_value(&mut r, wire, &field.ty, &|| format!("field {num} ({}) of {}", field.name, message.name))?;
        if field.name == schema::INLINE {
            // An embedded struct (`json:",inline"`): its fields are the parent's in JSON.
            if let Value::Object(inner) = value {
                out.extend(inner);
            }
        } else if field.repeated {
            push(&mut out, field, value);
        } else if !value.is_null() && (field.ptr || !is_zero(&value)) {
            out.insert(field.name.clone(), value);
        }
    }
    Ok(out)
}

fn push(out: &mut Map<String, Value>, field: &Field, value: Value) {
    let list = out.entry(field.name.clone()).or_insert_with(|| json!([]));
    list.as_array_mut().expect("repeated fields are arrays").push(value);
}

/// A non-pointer scalar at its zero value is left out, as Go's JSON `omitempty` does.
fn is_zero(v: &Value) -> bool {
    match v {
        Value::String(s) => s.is_empty(),
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        _ => false,
    }
}

/// One value of type `ty`; `what` names the field for errors.
fn decode_value(r: &mut Reader, wire: Wire, ty: &Type, what: &dyn Fn() -> String) -> Result<Value, ApiError> {
    let value = match (ty, wire) {
        (ty, Wire::Varint) if ty.is_varint() => scalar_varint(ty, r.varint()?),
        (Type::Double, Wire::Fixed64) => json!(f64::from_bits(r.fixed64()?)),
        (Type::String, Wire::Len) => json!(r.string()?),
        (Type::Bytes, Wire::Len) => json!(base64::engine::general_purpose::STANDARD.encode(r.bytes()?)),
        (Type::Time { micro }, Wire::Len) => time(r.bytes()?, *micro)?,
        (Type::Quantity, Wire::Len) => single_string(r.bytes()?)?,
        (Type::IntOrString, Wire::Len) => int_or_string(r.bytes()?)?,
        (Type::Duration, Wire::Len) => duration(r.bytes()?)?,
        (Type::RawJson, Wire::Len) => raw_json(r.bytes()?)?,
        (Type::Message(name), Wire::Len) => {
            let message = schema::message(name).expect("the schema's references are checked");
            Value::Object(decode_message(r.bytes()?, message)?)
        }
        _ => return Err(bad(&format!("{} has the wrong wire type", what()))),
    };
    Ok(value)
}

fn scalar_varint(ty: &Type, v: u64) -> Value {
    match ty {
        Type::Bool => json!(v != 0),
        Type::Int32 => json!(v as i64 as i32),
        _ => json!(v as i64),
    }
}

/// One `map<string, V>` entry: field 1 the key, field 2 the value.
fn decode_entry(bytes: &[u8], value_ty: &Type) -> Result<(String, Value), ApiError> {
    let (mut key, mut value) = (String::new(), None);
    let mut r = Reader::new(bytes);
    while let Some((num, wire)) = r.tag()? {
        match (num, wire) {
            (1, Wire::Len) => key = r.string()?,
            (2, _) => value = Some(decode_value(&mut r, wire, value_ty, &|| format!("the value of map key {key:?}"))?),
            _ => r.skip(wire)?,
        }
    }
    let empty = match value_ty {
        Type::String | Type::Bytes | Type::Quantity => json!(""),
        _ => json!({}),
    };
    Ok((key, value.unwrap_or(empty)))
}

/// `metav1.Time`/`MicroTime`: a Timestamp (1 seconds, 2 nanos). The zero time is absent.
fn time(bytes: &[u8], micro: bool) -> Result<Value, ApiError> {
    let (mut seconds, mut nanos) = (0i64, 0i64);
    let mut r = Reader::new(bytes);
    while let Some((num, wire)) = r.tag()? {
        match (num, wire) {
            (1, Wire::Varint) => seconds = r.varint()? as i64,
            (2, Wire::Varint) => nanos = r.varint()? as i64,
            _ => r.skip(wire)?,
        }
    }
    const GO_ZERO_TIME: i64 = -62_135_596_800;
    if (seconds == 0 && nanos == 0) || seconds == GO_ZERO_TIME {
        return Ok(Value::Null);
    }
    let text = crate::meta::rfc3339(seconds);
    Ok(json!(if micro { format!("{}.{:06}Z", &text[..text.len() - 1], nanos / 1000) } else { text }))
}

/// `resource.Quantity` (1 string).
fn single_string(bytes: &[u8]) -> Result<Value, ApiError> {
    let mut text = String::new();
    let mut r = Reader::new(bytes);
    while let Some((num, wire)) = r.tag()? {
        match (num, wire) {
            (1, Wire::Len) => text = r.string()?,
            _ => r.skip(wire)?,
        }
    }
    Ok(json!(text))
}

/// `intstr.IntOrString`: 1 type (0 int, 1 string), 2 intVal, 3 strVal.
fn int_or_string(bytes: &[u8]) -> Result<Value, ApiError> {
    let (mut ty, mut int, mut text) = (0u64, 0i64, String::new());
    let mut r = Reader::new(bytes);
    while let Some((num, wire)) = r.tag()? {
        match (num, wire) {
            (1, Wire::Varint) => ty = r.varint()?,
            (2, Wire::Varint) => int = r.varint()? as i64 as i32 as i64,
            (3, Wire::Len) => text = r.string()?,
            _ => r.skip(wire)?,
        }
    }
    Ok(if ty == 1 { json!(text) } else { json!(int) })
}

/// `metav1.Duration` (1 nanoseconds), written as Go parses it back.
fn duration(bytes: &[u8]) -> Result<Value, ApiError> {
    let mut nanos = 0i64;
    let mut r = Reader::new(bytes);
    while let Some((num, wire)) = r.tag()? {
        match (num, wire) {
            (1, Wire::Varint) => nanos = r.varint()? as i64,
            _ => r.skip(wire)?,
        }
    }
    Ok(json!(format!("{}s", nanos as f64 / 1e9)))
}

/// `runtime.RawExtension` and `metav1.FieldsV1` (1 raw): JSON bytes inside protobuf.
fn raw_json(bytes: &[u8]) -> Result<Value, ApiError> {
    let mut raw: &[u8] = &[];
    let mut r = Reader::new(bytes);
    while let Some((num, wire)) = r.tag()? {
        match (num, wire) {
            (1, Wire::Len) => raw = r.bytes()?,
            _ => r.skip(wire)?,
        }
    }
    if raw.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(raw).map_err(|e| bad(&format!("an embedded object is not JSON: {e}")))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Varint,
    Fixed64,
    Len,
    Fixed32,
}

/// A cursor over protobuf wire bytes.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn done(&self) -> bool {
        self.buf.is_empty()
    }

    fn truncated() -> ApiError {
        bad("the protobuf body is truncated")
    }

    fn varint(&mut self) -> Result<u64, ApiError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.buf.split_first().ok_or_else(Self::truncated)?;
            self.buf = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad("a protobuf varint is longer than 10 bytes"))
    }

    fn tag(&mut self) -> Result<Option<(u32, Wire)>, ApiError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let tag = self.varint()?;
        let wire = match tag & 7 {
            0 => Wire::Varint,
            1 => Wire::Fixed64,
            2 => Wire::Len,
            5 => Wire::Fixed32,
            other => return Err(bad(&format!("protobuf wire type {other} is not supported"))),
        };
        Ok(Some(((tag >> 3) as u32, wire)))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ApiError> {
        if self.buf.len() < n {
            return Err(Self::truncated());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn bytes(&mut self) -> Result<&'a [u8], ApiError> {
        let n = self.varint()? as usize;
        self.take(n)
    }

    fn string(&mut self) -> Result<String, ApiError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| bad("a protobuf string is not UTF-8"))
    }

    fn fixed64(&mut self) -> Result<u64, ApiError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn skip(&mut self, wire: Wire) -> Result<(), ApiError> {
        match wire {
            Wire::Varint => self.varint().map(drop),
            Wire::Fixed64 => self.take(8).map(drop),
            Wire::Len => self.bytes().map(drop),
            Wire::Fixed32 => self.take(4).map(drop),
        }
    }
}

#[cfg(test)]
mod tests;
