//! Tensor dimensions: a known integer, a symbolic expression over the model's named dimensions
//! (`batch`, `batch*7`, `seq-1`), or unknown.
//!
//! Symbolic dimensions are polynomials with integer coefficients over named symbols, kept in a
//! canonical form so that two expressions of the same size compare equal (`2*b - b == b`).
//! A polynomial that is a constant is always a `Dim::Known`. Division is exact or unknown: a
//! shape computation never guesses.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// One dimension of a tensor shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    Known(i64),
    Sym(Expr),
    Unknown,
}

/// A polynomial over named symbols: monomial (sorted symbol names, repeated for powers) ->
/// coefficient, no zero coefficient, and never a constant alone (that is `Dim::Known`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Expr(BTreeMap<Vec<String>, i64>);

impl Expr {
    fn constant(&self) -> i64 {
        self.0.get(&Vec::new()).copied().unwrap_or(0)
    }

    /// The symbols this expression uses.
    pub fn symbols(&self) -> impl Iterator<Item = &String> {
        self.0.keys().flatten()
    }

    /// Parse what `Display` writes (`2*a*b+a-1`); any other text is one symbol named by it, so
    /// an exporter's dim_param such as `seq-len` stays one symbol.
    fn parse(s: &str) -> Expr {
        let atom = || Expr(BTreeMap::from([(vec![s.to_string()], 1)]));
        let Some(terms) = parse_terms(s) else { return atom() };
        let e = Expr(terms);
        if e.0.is_empty() || e.0.keys().all(Vec::is_empty) || e.to_string() != s {
            return atom();
        }
        e
    }
}

fn parse_terms(s: &str) -> Option<BTreeMap<Vec<String>, i64>> {
    let mut out: BTreeMap<Vec<String>, i64> = BTreeMap::new();
    let mut rest = s;
    let mut first = true;
    while !rest.is_empty() {
        let sign = if let Some(r) = rest.strip_prefix('+') {
            if first {
                return None;
            }
            rest = r;
            1
        } else if let Some(r) = rest.strip_prefix('-') {
            rest = r;
            -1
        } else if first {
            1
        } else {
            return None;
        };
        first = false;
        let end = rest.find(['+', '-']).unwrap_or(rest.len());
        let (term, tail) = rest.split_at(end);
        rest = tail;
        let mut coef: i64 = sign;
        let mut syms = Vec::new();
        for f in term.split('*') {
            if f.is_empty() {
                return None;
            }
            if f.bytes().all(|c| c.is_ascii_digit()) {
                coef = coef.checked_mul(f.parse().ok()?)?;
            } else if f.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') && !f.as_bytes()[0].is_ascii_digit() {
                syms.push(f.to_string());
            } else {
                return None;
            }
        }
        syms.sort();
        *out.entry(syms).or_insert(0) += coef;
    }
    out.retain(|_, c| *c != 0);
    Some(out)
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Highest degree first, the constant last: `2*a*b+a-1`.
        let mut terms: Vec<(&Vec<String>, i64)> = self.0.iter().map(|(m, &c)| (m, c)).collect();
        terms.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(b.0)));
        for (i, (m, c)) in terms.iter().enumerate() {
            let c = *c;
            if c < 0 {
                write!(f, "-")?;
            } else if i > 0 {
                write!(f, "+")?;
            }
            let a = c.unsigned_abs();
            if m.is_empty() {
                write!(f, "{a}")?;
                continue;
            }
            if a != 1 {
                write!(f, "{a}*")?;
            }
            write!(f, "{}", m.join("*"))?;
        }
        Ok(())
    }
}

impl From<&str> for Expr {
    fn from(s: &str) -> Expr {
        Expr::parse(s)
    }
}

impl From<String> for Expr {
    fn from(s: String) -> Expr {
        Expr::parse(&s)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Known(v) => write!(f, "{v}"),
            Dim::Sym(s) => write!(f, "{s}"),
            Dim::Unknown => write!(f, "?"),
        }
    }
}

type Poly = BTreeMap<Vec<String>, i64>;

impl Dim {
    /// A named symbolic dimension (a graph input's `dim_param`).
    pub fn sym(name: &str) -> Dim {
        Dim::Sym(Expr::from(name))
    }

    /// A dim as `Display` writes it: an integer, `?`, or a symbolic expression.
    pub fn parse(s: &str) -> Dim {
        match s.parse::<i64>() {
            Ok(v) => Dim::Known(v),
            Err(_) if s == "?" => Dim::Unknown,
            Err(_) => Dim::sym(s),
        }
    }

    pub fn known(&self) -> Option<i64> {
        match self {
            Dim::Known(v) => Some(*v),
            _ => None,
        }
    }

    pub fn is_unknown(&self) -> bool {
        matches!(self, Dim::Unknown)
    }

    fn poly(&self) -> Option<Poly> {
        match self {
            Dim::Known(0) => Some(Poly::new()),
            Dim::Known(v) => Some(Poly::from([(Vec::new(), *v)])),
            Dim::Sym(e) => Some(e.0.clone()),
            Dim::Unknown => None,
        }
    }

    fn from_poly(mut p: Poly) -> Dim {
        p.retain(|_, c| *c != 0);
        if p.keys().all(Vec::is_empty) {
            return Dim::Known(p.get(&Vec::new()).copied().unwrap_or(0));
        }
        Dim::Sym(Expr(p))
    }

    fn combine(&self, o: &Dim, sign: i64) -> Dim {
        match (self.poly(), o.poly()) {
            (Some(mut a), Some(b)) => {
                for (m, c) in b {
                    let Some(v) = a.get(&m).copied().unwrap_or(0).checked_add(sign * c) else {
                        return Dim::Unknown;
                    };
                    a.insert(m, v);
                }
                Dim::from_poly(a)
            }
            _ => Dim::Unknown,
        }
    }

    pub fn add(&self, o: &Dim) -> Dim {
        self.combine(o, 1)
    }

    pub fn sub(&self, o: &Dim) -> Dim {
        self.combine(o, -1)
    }

    pub fn mul(&self, o: &Dim) -> Dim {
        match (self.poly(), o.poly()) {
            (Some(a), Some(b)) => {
                let mut out = Poly::new();
                for (ma, ca) in &a {
                    for (mb, cb) in &b {
                        let mut m: Vec<String> = ma.iter().chain(mb).cloned().collect();
                        m.sort();
                        let Some(v) = ca
                            .checked_mul(*cb)
                            .and_then(|p| p.checked_add(out.get(&m).copied().unwrap_or(0)))
                        else {
                            return Dim::Unknown;
                        };
                        out.insert(m, v);
                    }
                }
                Dim::from_poly(out)
            }
            _ => Dim::Unknown,
        }
    }

    /// Integer division as ONNX computes it on shape values (truncating; shapes are positive):
    /// exact for symbolic operands, unknown where it would not be.
    pub fn div(&self, o: &Dim) -> Dim {
        match (self, o) {
            (_, Dim::Known(0)) => Dim::Unknown,
            (Dim::Known(a), Dim::Known(b)) => a.checked_div(*b).map(Dim::Known).unwrap_or(Dim::Unknown),
            _ if self == o => Dim::Known(1),
            _ => match (self.poly(), o.poly()) {
                // Divide every term by a single-term divisor.
                (Some(a), Some(b)) if b.len() == 1 => {
                    let Some((dm, dc)) = b.into_iter().next() else {
                        return Dim::Unknown;
                    };
                    let mut out = Poly::new();
                    for (m, c) in a {
                        let mut rest = m.clone();
                        for s in &dm {
                            match rest.iter().position(|x| x == s) {
                                Some(i) => {
                                    rest.remove(i);
                                }
                                None => return Dim::Unknown,
                            }
                        }
                        if c % dc != 0 {
                            return Dim::Unknown;
                        }
                        out.insert(rest, c / dc);
                    }
                    Dim::from_poly(out)
                }
                _ => Dim::Unknown,
            },
        }
    }

    /// Remainder with the divisor's sign (ONNX `Mod` with `fmod=0`, Python's `%`): known
    /// operands, or a symbolic one that the divisor divides exactly (0).
    pub fn rem(&self, o: &Dim) -> Dim {
        match (self, o) {
            (Dim::Known(a), Dim::Known(b)) if *b != 0 => {
                let r = a.wrapping_rem(*b);
                Dim::Known(if r != 0 && (r < 0) != (*b < 0) { r + b } else { r })
            }
            _ if !self.div(o).is_unknown() && !matches!(o, Dim::Known(0)) => Dim::Known(0),
            _ => Dim::Unknown,
        }
    }

    /// `min`/`max` of shape values: known operands, or equal ones. A symbolic dimension is at
    /// least 0, so `min(d, huge)` is `d` for the huge sentinels exporters write for "to the end".
    pub fn min(&self, o: &Dim) -> Dim {
        match (self, o) {
            (Dim::Known(a), Dim::Known(b)) => Dim::Known(*a.min(b)),
            _ if self == o => self.clone(),
            (Dim::Sym(_), Dim::Known(b)) | (Dim::Known(b), Dim::Sym(_)) if *b >= i32::MAX as i64 => {
                if matches!(self, Dim::Sym(_)) {
                    self.clone()
                } else {
                    o.clone()
                }
            }
            (Dim::Sym(_), Dim::Known(b)) | (Dim::Known(b), Dim::Sym(_)) if *b <= 0 => Dim::Known(*b),
            _ => Dim::Unknown,
        }
    }

    pub fn max(&self, o: &Dim) -> Dim {
        match (self, o) {
            (Dim::Known(a), Dim::Known(b)) => Dim::Known(*a.max(b)),
            _ if self == o => self.clone(),
            (Dim::Sym(_), Dim::Known(b)) | (Dim::Known(b), Dim::Sym(_)) if *b <= 0 => {
                if matches!(self, Dim::Sym(_)) {
                    self.clone()
                } else {
                    o.clone()
                }
            }
            _ => Dim::Unknown,
        }
    }

    /// The value of this dimension once its symbols are bound.
    pub fn eval(&self, env: &HashMap<String, i64>) -> Option<i64> {
        match self {
            Dim::Known(v) => Some(*v),
            Dim::Unknown => None,
            Dim::Sym(e) => e.0.iter().try_fold(0i64, |acc, (m, c)| {
                let t = m.iter().try_fold(*c, |p, s| p.checked_mul(*env.get(s)?))?;
                acc.checked_add(t)
            }),
        }
    }

    /// The constant part of a symbolic dimension (`seq-1` -> -1).
    pub fn offset(&self) -> i64 {
        match self {
            Dim::Known(v) => *v,
            Dim::Sym(e) => e.constant(),
            Dim::Unknown => 0,
        }
    }
}

/// The product of several dimensions.
pub fn product<'a>(ds: impl IntoIterator<Item = &'a Dim>) -> Dim {
    ds.into_iter().fold(Dim::Known(1), |a, d| a.mul(d))
}

/// The sum of several dimensions.
pub fn sum<'a>(ds: impl IntoIterator<Item = &'a Dim>) -> Dim {
    ds.into_iter().fold(Dim::Known(0), |a, d| a.add(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_arithmetic() {
        let b = Dim::sym("batch");
        let s = Dim::sym("seq");
        let seven = Dim::Known(7);
        let b7 = b.mul(&seven);
        assert_eq!(b7.to_string(), "7*batch");
        assert_eq!(b7.div(&seven), b);
        assert_eq!(b7.div(&b), seven);
        assert_eq!(b7.sub(&b).sub(&b.mul(&Dim::Known(6))), Dim::Known(0));
        assert_eq!(b.mul(&s).div(&s), b);
        assert!(b.div(&Dim::Known(2)).is_unknown());
        assert!(b.add(&Dim::Known(1)).div(&b).is_unknown());
        let e = s.sub(&Dim::Known(1)).mul(&b).add(&b);
        assert_eq!(e, b.mul(&s));
        assert_eq!(s.sub(&Dim::Known(1)).to_string(), "seq-1");
        assert_eq!(
            Dim::Known(-7).rem(&Dim::Known(3)),
            Dim::Known(2),
            "the sign of the divisor"
        );
        assert_eq!(Dim::Known(7).rem(&Dim::Known(-3)), Dim::Known(-2));
        assert_eq!(b7.rem(&seven), Dim::Known(0));
        assert_eq!(s.min(&Dim::Known(i64::MAX)), s);
        let env = HashMap::from([("batch".to_string(), 3), ("seq".to_string(), 5)]);
        assert_eq!(e.eval(&env), Some(15));
        assert!(Dim::Unknown.add(&b).is_unknown());
    }

    #[test]
    fn display_round_trips_and_foreign_names_stay_atoms() {
        for s in ["batch", "7*batch", "seq-1", "2*a*b+a-1", "-a+3", "batch*batch"] {
            let e = Expr::from(s);
            assert_eq!(e.to_string(), s);
            assert_eq!(Expr::from(e.to_string()), e);
        }
        // An exporter's names are symbols, whatever characters they hold.
        for s in [
            "seq-len",
            "unk__12",
            "N",
            "batch size",
            "2",
            "s0+",
            "StatefulPartitionedCall:0",
        ] {
            let e = Expr::from(s);
            assert_eq!(e.symbols().collect::<Vec<_>>(), vec![s], "{s}");
        }
    }
}
