//! Arguments as `#[derive(Deserialize)]` structs, with errors that name the argument: what the
//! control commands (and a `--faults` file's entries) take.
//!
//! A command's arguments arrive as one JSON object. [`Args`] hands it out struct by struct:
//! [`Args::take`] fills a struct from just the keys that struct declares (other keys stay for
//! later takes), [`Args::take_tagged`] picks one variant of an enum by the value of a tag key
//! (fault-add's `mode`) and fills that variant's fields, and [`Args::finish`] refuses any key
//! no take claimed. serde's own `#[serde(tag = ...)]` and `flatten` are not used for input:
//! they buffer the object, so a value's error no longer knows its key, and they ignore
//! `deny_unknown_fields`. Here every error is an [`ArgError`] whose `field` is the argument at
//! fault, which is what a client sees first in the reply.
//!
//! Only what serde can check is checked here (presence, type, enum names); ranges that depend
//! on the disk or on each other stay with the command, as [`ArgError`]s too.
//!
//! This module depends on serde alone: `fault` uses it as well as `control`, so it sits below
//! both.

use std::collections::BTreeSet;
use std::fmt::{self, Display};

use serde::de::value::{BorrowedStrDeserializer, StrDeserializer};
use serde::de::Error as _;
use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, Expected, MapAccess, Unexpected,
    VariantAccess, Visitor,
};
use serde::forward_to_deserialize_any;
use serde::Deserialize;
use serde_json::{Map, Value};

/// A bad argument: `field` names it, `desc` says what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {desc}")]
pub struct ArgError {
    pub field: String,
    pub desc: String,
}

/// The `desc` of a required argument that is absent, before [`ArgError::explain_missing`].
const MISSING: &str = "missing";

impl ArgError {
    pub fn new(field: impl Into<String>, desc: impl Into<String>) -> ArgError {
        ArgError {
            field: field.into(),
            desc: desc.into(),
        }
    }

    /// Says what `field` is when this error is that it is missing, so that the client learns
    /// what to give: `lba: missing: the first logical block`.
    pub fn explain_missing(self, field: &str, what: &str) -> ArgError {
        if self.field == field && self.desc == MISSING {
            ArgError::new(field, format!("{MISSING}: {what}"))
        } else {
            self
        }
    }

    /// [`explain_missing`](Self::explain_missing) for whichever field is missing.
    fn explain_missing_any(self, what: &str) -> ArgError {
        let field = self.field.clone();
        self.explain_missing(&field, what)
    }

    /// Names `field` when the error does not name one yet: serde raises value errors without
    /// knowing the key the value came from.
    fn at(mut self, field: &str) -> ArgError {
        if self.field.is_empty() {
            self.field = field.to_string();
        }
        self
    }
}

impl de::Error for ArgError {
    fn custom<T: Display>(msg: T) -> ArgError {
        ArgError::new("", msg.to_string())
    }

    fn invalid_type(unexp: Unexpected, exp: &dyn Expected) -> ArgError {
        ArgError::new("", format!("must be {}, got {}", expected(exp), got(unexp)))
    }

    fn invalid_value(unexp: Unexpected, exp: &dyn Expected) -> ArgError {
        ArgError::invalid_type(unexp, exp)
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> ArgError {
        ArgError::new(
            "",
            format!("must be {}, got {}", either(expected), Value::from(variant)),
        )
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> ArgError {
        ArgError::new(
            field,
            format!("unknown argument; expected {}", either(expected)),
        )
    }

    fn missing_field(field: &'static str) -> ArgError {
        ArgError::new(field, MISSING)
    }

    fn duplicate_field(field: &'static str) -> ArgError {
        ArgError::new(field, "given twice")
    }
}

/// What serde expected, in the words of the argument's user rather than Rust's type names.
fn expected(exp: &dyn Expected) -> String {
    let rust = exp.to_string();
    match rust.as_str() {
        "u64" | "usize" => "a non-negative integer".to_string(),
        "i64" | "isize" => "an integer".to_string(),
        "f64" | "f32" => "a number".to_string(),
        _ => rust,
    }
}

/// The offending value as the client wrote it (JSON), not as serde describes it.
fn got(unexp: Unexpected) -> String {
    match unexp {
        Unexpected::Bool(b) => b.to_string(),
        Unexpected::Unsigned(n) => n.to_string(),
        Unexpected::Signed(n) => n.to_string(),
        Unexpected::Float(f) => Value::from(f).to_string(),
        Unexpected::Str(s) => Value::from(s).to_string(),
        Unexpected::Unit => "null".to_string(),
        Unexpected::Seq => "a list".to_string(),
        Unexpected::Map => "an object".to_string(),
        other => other.to_string(),
    }
}

/// `a`, `a or b`, `a, b or c`.
fn either(names: &[&str]) -> String {
    match names {
        [] => "nothing".to_string(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// The arguments of one command, handed out struct by struct; see the module's text.
pub struct Args<'a> {
    map: &'a Map<String, Value>,
    /// The keys a take has claimed.
    taken: BTreeSet<&'a str>,
    /// Every key some take offered to claim, in that order: what [`finish`](Self::finish)
    /// says the command takes.
    known: Vec<&'static str>,
    /// The keys of the variants [`take_tagged`](Self::take_tagged) did not pick: (key, tag,
    /// variant), so that `finish` can say where such a key belongs.
    elsewhere: Vec<(&'static str, &'static str, &'static str)>,
}

impl<'a> Args<'a> {
    pub fn new(map: &'a Map<String, Value>) -> Args<'a> {
        Args {
            map,
            taken: BTreeSet::new(),
            known: Vec::new(),
            elsewhere: Vec::new(),
        }
    }

    /// Fills struct `T` from the keys it declares that no earlier take claimed, and claims
    /// them. A required field that is absent is an error `FIELD: missing` (see
    /// [`ArgError::explain_missing`]); a field with a value of the wrong type or an unknown
    /// enum name, `FIELD: must be ..., got VALUE`.
    pub fn take<T: Deserialize<'a>>(&mut self) -> Result<T, ArgError> {
        T::deserialize(Claim {
            args: self,
            variant: None,
        })
        .map_err(|e| e.at("arguments"))
    }

    /// Takes enum `E` by the variant that argument `tag` names (`default` when it is absent):
    /// claims `tag`, then the fields of that variant as [`take`](Self::take) does a struct's.
    /// `E` is externally tagged (serde's default) with struct or unit variants. The fields of
    /// the other variants stay unclaimed; [`finish`](Self::finish) names the variant such a
    /// key belongs to.
    pub fn take_tagged<E: Deserialize<'a>>(
        &mut self,
        tag: &'static str,
        default: &'a str,
    ) -> Result<E, ArgError> {
        let variants = variants_of::<E>();
        self.know(&[tag]);
        for (_, fields) in &variants {
            self.know(fields);
        }
        let name = match self.map.get_key_value(tag) {
            None => default,
            Some((key, Value::String(name))) => {
                self.taken.insert(key);
                name
            }
            Some((_, v)) => {
                let names: Vec<&str> = variants.iter().map(|(n, _)| *n).collect();
                return Err(ArgError::new(
                    tag,
                    format!("must be {}, got {v}", either(&names)),
                ));
            }
        };
        for (variant, fields) in &variants {
            if *variant != name {
                self.elsewhere
                    .extend(fields.iter().map(|&f| (f, tag, *variant)));
            }
        }
        E::deserialize(Claim {
            args: self,
            variant: Some(name),
        })
        .map_err(|e| {
            e.at(tag)
                .explain_missing_any(&format!("{tag} {name} needs it"))
        })
    }

    /// Refuses the first key no take claimed: it is named, with the variant it belongs to
    /// when it is a field of a variant not picked, else with every argument the command takes.
    pub fn finish(self, command: &str) -> Result<(), ArgError> {
        let Some(key) = self.map.keys().find(|k| !self.taken.contains(k.as_str())) else {
            return Ok(());
        };
        let owners: Vec<String> = self
            .elsewhere
            .iter()
            .filter(|(f, _, _)| f == key)
            .map(|(_, tag, variant)| format!("{tag} {variant}"))
            .collect();
        if !owners.is_empty() {
            let owners: Vec<&str> = owners.iter().map(String::as_str).collect();
            return Err(ArgError::new(
                key.as_str(),
                format!("only applies to {}", either(&owners)),
            ));
        }
        let takes = if self.known.is_empty() {
            "none".to_string()
        } else {
            self.known.join(", ")
        };
        Err(ArgError::new(
            key.as_str(),
            format!("unknown argument; {command} takes {takes}"),
        ))
    }

    /// Adds `fields` to what the command takes, each once.
    fn know(&mut self, fields: &[&'static str]) {
        for f in fields {
            if !self.known.contains(f) {
                self.known.push(f);
            }
        }
    }

    /// Claims the unclaimed keys among `fields` and hands them to serde as a map.
    fn claim(&mut self, fields: &'static [&'static str]) -> Entries<'a> {
        self.know(fields);
        let map = self.map;
        let mut picked = Vec::new();
        for (key, value) in map {
            if fields.contains(&key.as_str()) && self.taken.insert(key.as_str()) {
                picked.push((key.as_str(), value));
            }
        }
        Entries {
            rest: picked.into_iter(),
            value: None,
        }
    }
}

/// The deserializer [`Args::take`] and [`Args::take_tagged`] hand to serde's derive: a struct
/// is filled from the keys it declares; with `variant`, an enum is that variant, and its fields
/// are filled the same way.
struct Claim<'s, 'a> {
    args: &'s mut Args<'a>,
    variant: Option<&'a str>,
}

impl<'de> Deserializer<'de> for Claim<'_, 'de> {
    type Error = ArgError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        // A programming error, not the client's.
        Err(ArgError::custom(format_args!(
            "internal error: {} cannot be taken from arguments, only a struct or an enum by a tag",
            Expecting(&visitor)
        )))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ArgError> {
        visitor.visit_map(self.args.claim(fields))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ArgError> {
        match self.variant {
            Some(_) => visitor.visit_enum(self),
            None => self.deserialize_any(visitor),
        }
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map identifier
        ignored_any
    }
}

/// Shows what a visitor expects (`Expected` is implemented for visitors, but not `Display`).
struct Expecting<'v>(&'v dyn Expected);

impl Display for Expecting<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'s, 'de> EnumAccess<'de> for Claim<'s, 'de> {
    type Error = ArgError;
    type Variant = Claim<'s, 'de>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self::Variant), ArgError> {
        let name = self.variant.unwrap_or_default();
        let variant = seed.deserialize(BorrowedStrDeserializer::new(name))?;
        Ok((variant, self))
    }
}

impl<'de> VariantAccess<'de> for Claim<'_, 'de> {
    type Error = ArgError;

    fn unit_variant(self) -> Result<(), ArgError> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, ArgError> {
        seed.deserialize(Claim {
            args: self.args,
            variant: None,
        })
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, ArgError> {
        Err(ArgError::custom(format_args!(
            "internal error: {} has no argument names",
            Expecting(&visitor)
        )))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ArgError> {
        visitor.visit_map(self.args.claim(fields))
    }
}

/// The claimed keys and their values, as serde's derive reads a struct.
struct Entries<'a> {
    rest: std::vec::IntoIter<(&'a str, &'a Value)>,
    /// The entry whose key was read last, for `next_value_seed`.
    value: Option<(&'a str, &'a Value)>,
}

impl<'de> MapAccess<'de> for Entries<'de> {
    type Error = ArgError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ArgError> {
        let Some((key, value)) = self.rest.next() else {
            return Ok(None);
        };
        self.value = Some((key, value));
        seed.deserialize(BorrowedStrDeserializer::new(key))
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, ArgError> {
        let (key, value) = self
            .value
            .take()
            .ok_or_else(|| ArgError::custom("internal error: a value asked for before its key"))?;
        seed.deserialize(ValueDe(value)).map_err(|e| e.at(key))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.rest.len())
    }
}

/// One argument's value. Scalars only: no argument is a list or an object, so those are
/// refused as the wrong type.
struct ValueDe<'a>(&'a Value);

impl<'de> Deserializer<'de> for ValueDe<'de> {
    type Error = ArgError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    visitor.visit_u64(u)
                } else if let Some(i) = n.as_i64() {
                    visitor.visit_i64(i)
                } else {
                    // Without serde_json's arbitrary_precision every other number is an f64.
                    visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(s) => visitor.visit_borrowed_str(s),
            Value::Array(_) => Err(de::Error::invalid_type(Unexpected::Seq, &visitor)),
            Value::Object(_) => Err(de::Error::invalid_type(Unexpected::Map, &visitor)),
        }
    }

    /// `null` is an absent optional argument.
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    /// An enum argument is the name of a unit variant (`op=read`).
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ArgError> {
        match self.0 {
            Value::String(s) => visitor.visit_enum(StrDeserializer::new(s)),
            other => Err(ArgError::new(
                "",
                format!("must be {}, got {other}", either(variants)),
            )),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ArgError> {
        visitor.visit_newtype_struct(self)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

/// The variants of enum `E` and the fields of each, learnt by running `E`'s derived
/// `Deserialize` against a deserializer that only records what it is asked for: serde offers
/// no other way to list them, and `finish` wants them to say where a stray key belongs.
fn variants_of<'de, E: Deserialize<'de>>() -> Vec<(&'static str, &'static [&'static str])> {
    let Err(Probed::Variants(names)) = E::deserialize(Probe(None)) else {
        return Vec::new();
    };
    names
        .iter()
        .map(|&name| match E::deserialize(Probe(Some(name))) {
            Err(Probed::Fields(fields)) => (name, fields),
            _ => (name, &[][..]),
        })
        .collect()
}

/// What a [`Probe`] learnt; it travels as the error that stops the deserialization.
#[derive(Debug)]
enum Probed {
    Variants(&'static [&'static str]),
    Fields(&'static [&'static str]),
    /// Anything else: `E` is not an enum of struct or unit variants.
    Other,
}

impl Display for Probed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

impl std::error::Error for Probed {}

impl de::Error for Probed {
    fn custom<T: Display>(_msg: T) -> Probed {
        Probed::Other
    }
}

/// `Probe(None)` records an enum's variant names; `Probe(Some(v))` the fields of variant `v`
/// (of a struct variant, or of the struct a newtype variant holds; none for a unit variant).
struct Probe(Option<&'static str>);

impl<'de> Deserializer<'de> for Probe {
    type Error = Probed;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Probed> {
        Err(Probed::Other)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Probed> {
        match self.0 {
            None => Err(Probed::Variants(variants)),
            Some(_) => visitor.visit_enum(self),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Probed> {
        Err(Probed::Fields(fields))
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map identifier
        ignored_any
    }
}

impl<'de> EnumAccess<'de> for Probe {
    type Error = Probed;
    type Variant = Probe;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Probe), Probed> {
        let name = self.0.unwrap_or_default();
        let variant = seed.deserialize(StrDeserializer::new(name))?;
        Ok((variant, self))
    }
}

impl<'de> VariantAccess<'de> for Probe {
    type Error = Probed;

    fn unit_variant(self) -> Result<(), Probed> {
        Err(Probed::Fields(&[]))
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Probed> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _visitor: V) -> Result<V::Value, Probed> {
        Err(Probed::Other)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Probed> {
        Err(Probed::Fields(fields))
    }
}

/// serde's default for a count or a stride that is not given.
pub fn one() -> u64 {
    1
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    enum Colour {
        Red,
        Blue,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    struct Common {
        lba: u64,
        #[serde(default = "one")]
        count: u64,
        colour: Option<Colour>,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    enum Mode {
        Error,
        Delay { delay_ms: u64 },
        Flaky { probability: f64, seed: Option<u64> },
    }

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    /// Takes `Common` and a `Mode` by `mode` from `v`, then finishes.
    fn parse(v: Value) -> Result<(Common, Mode), ArgError> {
        let m = map(v);
        let mut args = Args::new(&m);
        let common = args.take()?;
        let mode = args.take_tagged("mode", "error")?;
        args.finish("test-command")?;
        Ok((common, mode))
    }

    fn err(v: Value) -> String {
        parse(v).unwrap_err().to_string()
    }

    #[test]
    fn structs_take_their_own_keys_and_defaults() {
        let (c, m) =
            parse(json!({"lba": 3, "mode": "flaky", "probability": 1, "colour": "blue"})).unwrap();
        assert_eq!(
            c,
            Common {
                lba: 3,
                count: 1,
                colour: Some(Colour::Blue)
            }
        );
        assert_eq!(
            m,
            Mode::Flaky {
                probability: 1.0,
                seed: None
            }
        );
        let (c, m) = parse(json!({"lba": 0, "count": 7, "colour": null})).unwrap();
        assert_eq!((c.count, c.colour, m), (7, None, Mode::Error));
    }

    #[test]
    fn a_missing_field_is_named() {
        assert_eq!(err(json!({"count": 2})), "lba: missing");
        assert_eq!(
            err(json!({"lba": 1, "mode": "delay"})),
            "delay_ms: missing: mode delay needs it"
        );
        let e = parse(json!({})).unwrap_err();
        assert_eq!(
            e.explain_missing("lba", "the first block").to_string(),
            "lba: missing: the first block"
        );
    }

    #[test]
    fn an_unknown_key_is_named_with_what_the_command_takes() {
        assert_eq!(
            err(json!({"lba": 1, "cuont": 2})),
            "cuont: unknown argument; test-command takes lba, count, colour, mode, delay_ms, probability, seed"
        );
        let m = map(json!({"verbose": 1}));
        assert_eq!(
            Args::new(&m)
                .finish("query-status")
                .unwrap_err()
                .to_string(),
            "verbose: unknown argument; query-status takes none"
        );
    }

    #[test]
    fn a_key_of_another_variant_is_named_with_its_variant() {
        assert_eq!(
            err(json!({"lba": 1, "delay_ms": 5})),
            "delay_ms: only applies to mode delay"
        );
        assert_eq!(
            err(json!({"lba": 1, "mode": "delay", "delay_ms": 5, "seed": 2})),
            "seed: only applies to mode flaky"
        );
    }

    #[test]
    fn a_value_of_the_wrong_type_is_named_with_the_value() {
        assert_eq!(
            err(json!({"lba": -1})),
            "lba: must be a non-negative integer, got -1"
        );
        assert_eq!(
            err(json!({"lba": 1.5})),
            "lba: must be a non-negative integer, got 1.5"
        );
        assert_eq!(
            err(json!({"lba": "7"})),
            "lba: must be a non-negative integer, got \"7\""
        );
        assert_eq!(
            err(json!({"lba": [7]})),
            "lba: must be a non-negative integer, got a list"
        );
        assert_eq!(
            err(json!({"lba": 1, "mode": "flaky", "probability": "half"})),
            "probability: must be a number, got \"half\""
        );
        assert_eq!(
            err(json!({"lba": 1, "mode": 3})),
            "mode: must be error, delay or flaky, got 3"
        );
    }

    #[test]
    fn a_wrong_enum_name_is_named_with_the_choices() {
        assert_eq!(
            err(json!({"lba": 1, "colour": "green"})),
            "colour: must be red or blue, got \"green\""
        );
        assert_eq!(
            err(json!({"lba": 1, "colour": 2})),
            "colour: must be red or blue, got 2"
        );
        assert_eq!(
            err(json!({"lba": 1, "mode": "melt"})),
            "mode: must be error, delay or flaky, got \"melt\""
        );
    }

    #[test]
    fn every_error_starts_with_its_field() {
        for v in [
            json!({}),
            json!({"lba": true}),
            json!({"lba": 1, "count": -3}),
            json!({"lba": 1, "mode": "flaky"}),
            json!({"lba": 1, "mode": "flaky", "probability": 0.5, "seed": 0.5}),
            json!({"lba": 1, "x": 1}),
        ] {
            let e = parse(v.clone()).unwrap_err();
            assert!(!e.field.is_empty(), "{v}: {e}");
            assert!(
                v.get(&e.field).is_some() || e.desc.starts_with(MISSING),
                "{v}: {e}"
            );
        }
    }

    #[test]
    fn variants_and_their_fields_are_listed() {
        assert_eq!(
            variants_of::<Mode>(),
            vec![
                ("error", &[][..]),
                ("delay", &["delay_ms"][..]),
                ("flaky", &["probability", "seed"][..]),
            ]
        );
    }
}
