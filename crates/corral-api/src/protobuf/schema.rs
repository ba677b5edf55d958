//! The message layouts of `schema.txt`, parsed once.
//!
//! One message per block: `message Name`, then one line per field,
//! `<number> <jsonName> <type> [repeated] [ptr]`. `ptr` marks a Go pointer field, whose zero
//! value is kept because it was set on purpose. A field named `...` is an embedded struct
//! whose fields are the parent's in JSON ([`INLINE`]).

use std::collections::HashMap;
use std::sync::LazyLock;

/// The name of a field embedded inline (`json:",inline"`).
pub const INLINE: &str = "...";

#[derive(Debug, Clone, PartialEq)]
pub enum Type {
    String,
    Bytes,
    Int32,
    Int64,
    Bool,
    Double,
    Time {
        micro: bool,
    },
    Quantity,
    IntOrString,
    Duration,
    /// JSON carried as bytes: `runtime.RawExtension`, `metav1.FieldsV1`.
    RawJson,
    /// `map<string, V>`.
    Map(Box<Type>),
    Message(String),
}

impl Type {
    pub fn is_varint(&self) -> bool {
        matches!(self, Type::Int32 | Type::Int64 | Type::Bool)
    }

    fn parse(text: &str) -> Type {
        match text {
            "string" => Type::String,
            "bytes" => Type::Bytes,
            "int32" => Type::Int32,
            "int64" => Type::Int64,
            "bool" => Type::Bool,
            "double" => Type::Double,
            "Time" => Type::Time { micro: false },
            "MicroTime" => Type::Time { micro: true },
            "Quantity" => Type::Quantity,
            "IntOrString" => Type::IntOrString,
            "Duration" => Type::Duration,
            "RawExtension" | "FieldsV1" => Type::RawJson,
            _ => match text.strip_prefix("map<string,").and_then(|t| t.strip_suffix('>')) {
                Some(value) => Type::Map(Box::new(Type::parse(value))),
                None => Type::Message(text.to_string()),
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct Field {
    pub num: u32,
    pub name: String,
    pub ty: Type,
    pub repeated: bool,
    pub ptr: bool,
}

#[derive(Debug)]
pub struct Message {
    pub name: String,
    pub fields: Vec<Field>,
}

impl Message {
    pub fn field(&self, num: u32) -> Option<&Field> {
        self.fields.iter().find(|f| f.num == num)
    }
}

static SCHEMA: LazyLock<HashMap<String, Message>> =
    LazyLock::new(|| parse(include_str!("schema.txt")).expect("schema.txt is checked by its tests"));

/// Every message, in name order.
pub fn messages() -> Vec<&'static Message> {
    let mut all: Vec<&Message> = SCHEMA.values().collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all
}

/// The layout of a message (or a top-level kind) by name.
pub fn message(name: &str) -> Option<&'static Message> {
    SCHEMA.get(name)
}

/// Parses the table and checks that every message it references is in it.
pub fn parse(text: &str) -> Result<HashMap<String, Message>, String> {
    let mut messages: HashMap<String, Message> = HashMap::new();
    let mut current: Option<Message> = None;
    for (i, line) in text.lines().enumerate() {
        let at = |msg: &str| format!("schema.txt line {}: {msg}: {line:?}", i + 1);
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix("message ") {
            if let Some(done) = current.take() {
                messages.insert(done.name.clone(), done);
            }
            if messages.contains_key(name.trim()) {
                return Err(at("a message is defined twice"));
            }
            current = Some(Message { name: name.trim().to_string(), fields: Vec::new() });
            continue;
        }
        let message = current.as_mut().ok_or_else(|| at("a field outside a message"))?;
        let words: Vec<&str> = trimmed.split_whitespace().collect();
        let [num, name, ty, flags @ ..] = words.as_slice() else {
            return Err(at("a field needs a number, a name and a type"));
        };
        if let Some(bad) = flags.iter().find(|f| !matches!(**f, "repeated" | "ptr")) {
            return Err(at(&format!("unknown flag {bad}")));
        }
        let num = num.parse().map_err(|_| at("the field number is not a number"))?;
        if message.field(num).is_some() {
            return Err(at("a field number is used twice"));
        }
        message.fields.push(Field {
            num,
            name: name.to_string(),
            ty: Type::parse(ty),
            repeated: flags.contains(&"repeated"),
            ptr: flags.contains(&"ptr"),
        });
    }
    if let Some(done) = current.take() {
        messages.insert(done.name.clone(), done);
    }
    for m in messages.values() {
        for f in &m.fields {
            let mut ty = &f.ty;
            while let Type::Map(inner) = ty {
                ty = inner;
            }
            if let Type::Message(name) = ty
                && !messages.contains_key(name)
            {
                return Err(format!("{}.{} refers to {name}, which is not in schema.txt", m.name, f.name));
            }
        }
    }
    Ok(messages)
}
