//! AWS thing names of devices: `{product_key}_{device_name}` by default, or whatever
//! `--mqtt-thing-template` says, both ways (the AWS facade's `thingName`, MQTT topics).

/// A piece of a thing-name template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece<'a> {
    Literal(&'a str),
    ProductKey,
    DeviceName,
}

fn pieces(template: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut rest = template;
    while !rest.is_empty() {
        let next = [
            ("{product_key}", Piece::ProductKey),
            ("{device_name}", Piece::DeviceName),
        ]
        .into_iter()
        .filter_map(|(p, piece)| rest.find(p).map(|i| (i, p.len(), piece)))
        .min_by_key(|(i, _, _)| *i);
        match next {
            Some((i, len, piece)) => {
                if i > 0 {
                    out.push(Piece::Literal(&rest[..i]));
                }
                out.push(piece);
                rest = &rest[i + len..];
            }
            None => {
                out.push(Piece::Literal(rest));
                rest = "";
            }
        }
    }
    out
}

/// The thing name of a device under `template`.
pub fn thing_name(template: &str, product_key: &str, device_name: &str) -> String {
    template
        .replace("{product_key}", product_key)
        .replace("{device_name}", device_name)
}

/// Every (product key, device name) that `template` turns into `thing`, most likely first;
/// the product key is `None` when the template has none. Several readings exist when a
/// separator also occurs inside a name (`p_a_b`: `p`+`a_b` or `p_a`+`b`); the caller picks
/// the one naming a device.
pub fn candidates(template: &str, thing: &str) -> Vec<(Option<String>, String)> {
    let mut out = Vec::new();
    walk(&pieces(template), thing, None, None, &mut out);
    out
}

fn walk(
    pieces: &[Piece<'_>],
    rest: &str,
    pk: Option<&str>,
    dn: Option<&str>,
    out: &mut Vec<(Option<String>, String)>,
) {
    let Some((first, tail)) = pieces.split_first() else {
        if let (true, Some(dn)) = (rest.is_empty(), dn) {
            out.push((pk.map(str::to_string), dn.to_string()));
        }
        return;
    };
    match first {
        Piece::Literal(l) => {
            if let Some(r) = rest.strip_prefix(l) {
                walk(tail, r, pk, dn, out);
            }
        }
        Piece::ProductKey | Piece::DeviceName => {
            let is_pk = *first == Piece::ProductKey;
            let bound = if is_pk { pk } else { dn };
            for end in (1..=rest.len()).filter(|&e| rest.is_char_boundary(e)) {
                let (value, r) = rest.split_at(end);
                if bound.is_some_and(|b| b != value) {
                    continue;
                }
                if is_pk {
                    walk(tail, r, Some(value), dn, out);
                } else {
                    walk(tail, r, pk, Some(value), out);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(template: &str, thing: &str) -> Vec<(Option<String>, String)> {
        candidates(template, thing)
    }

    #[test]
    fn reads_thing_names_back() {
        let t = "{product_key}_{device_name}";
        assert_eq!(thing_name(t, "a1B2c3D4e5F", "cam-1"), "a1B2c3D4e5F_cam-1");
        assert_eq!(
            pairs(t, "a1B2c3D4e5F_cam-1"),
            vec![(Some("a1B2c3D4e5F".into()), "cam-1".into())]
        );
        assert_eq!(
            pairs(t, "p_a_b"),
            vec![
                (Some("p".into()), "a_b".into()),
                (Some("p_a".into()), "b".into())
            ]
        );
        assert!(pairs(t, "nounderscore").is_empty());
        assert_eq!(pairs("t-{device_name}", "t-x"), vec![(None, "x".into())]);
        assert!(pairs("t-{device_name}", "u-x").is_empty());
        assert_eq!(
            pairs("{device_name}.{product_key}.{device_name}", "d.p.d"),
            vec![(Some("p".into()), "d".into())]
        );
        assert!(pairs("{device_name}.{product_key}.{device_name}", "d.p.e").is_empty());
    }
}
