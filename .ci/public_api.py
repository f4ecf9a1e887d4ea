#!/usr/bin/env python3
"""Renders a crate's public API from rustdoc's JSON output (`--output-format json`).

Usage: public_api.py CRATE.json  (the listing goes to stdout; .ci/public-api drives it)

One line per public item reachable from the crate root, grouped by item and sorted, so that a
change to the surface is a small, readable diff:

* modules, structs (public fields), enums (variants), unions, traits (every associated item;
  provided methods are marked), functions and methods with full signatures, consts, statics,
  type aliases, macros;
* each item is listed at every path it can be named by: `pub use` re-exports (also of items in
  private modules, and globs) are followed to their target; a re-export of another crate's item
  is listed as `pub use PATH -> TARGET`;
* trait impls written in the source (derived or by hand: Clone, Debug, Display, Error, From...)
  are listed; impls rustdoc synthesizes (auto traits: Send, Sync, Unpin, UnwindSafe...) and
  blanket impls from other crates (From<T> for T, Into, Any, Borrow, ToOwned...) are not;
* types are printed by their canonical path: this crate's items by their public path, other
  crates' items by the path rustdoc records for them (where they are defined, e.g.
  `core::net::socket_addr::SocketAddr`), so the listing does not depend on how the source
  imports a name; a handful of prelude names (Option, Result, String, Vec, Box, Clone, Send...)
  are printed bare.

Only the rustdoc JSON format versions in SUPPORTED_FORMATS are read; any other fails clearly.
"""

import json
import sys

# Format versions this renderer was written and tested against. Rustdoc's JSON is unstable;
# a new toolchain may bump the version, and then this script must be checked (and the
# version added here) before the listing can be trusted.
SUPPORTED_FORMATS = {57}

PRELUDE = {
    "core::option::Option": "Option",
    "core::result::Result": "Result",
    "alloc::string::String": "String",
    "alloc::vec::Vec": "Vec",
    "alloc::boxed::Box": "Box",
    "core::clone::Clone": "Clone",
    "core::marker::Copy": "Copy",
    "core::marker::Send": "Send",
    "core::marker::Sync": "Sync",
    "core::marker::Sized": "Sized",
    "core::marker::Unpin": "Unpin",
    "core::default::Default": "Default",
    "core::ops::drop::Drop": "Drop",
    "core::ops::function::Fn": "Fn",
    "core::ops::function::FnMut": "FnMut",
    "core::ops::function::FnOnce": "FnOnce",
    "core::convert::From": "From",
    "core::convert::Into": "Into",
    "core::convert::AsRef": "AsRef",
    "core::convert::AsMut": "AsMut",
    "core::convert::TryFrom": "TryFrom",
    "core::convert::TryInto": "TryInto",
    "core::iter::traits::iterator::Iterator": "Iterator",
    "core::iter::traits::collect::IntoIterator": "IntoIterator",
    "core::iter::traits::collect::FromIterator": "FromIterator",
    "core::iter::traits::collect::Extend": "Extend",
    "core::iter::traits::double_ended::DoubleEndedIterator": "DoubleEndedIterator",
    "core::iter::traits::exact_size::ExactSizeIterator": "ExactSizeIterator",
    "core::cmp::PartialEq": "PartialEq",
    "core::cmp::Eq": "Eq",
    "core::cmp::PartialOrd": "PartialOrd",
    "core::cmp::Ord": "Ord",
    "alloc::string::ToString": "ToString",
    "alloc::borrow::ToOwned": "ToOwned",
    "core::future::future::Future": "Future",
    "core::future::into_future::IntoFuture": "IntoFuture",
}

# Block-internal order of lines.
R_HEAD, R_MEMBER, R_ASSOC, R_METHOD, R_IMPL, R_TRAIT_IMPL = range(6)


def kind_of(inner):
    return inner if isinstance(inner, str) else next(iter(inner))


def payload(inner):
    return None if isinstance(inner, str) else next(iter(inner.values()))


class Api:
    def __init__(self, doc):
        self.doc = doc
        self.index = doc["index"]
        self.paths = doc["paths"]
        self.root = str(doc["root"])
        self.crate = self.index[self.root]["name"]
        self.canonical = {}  # item id -> public path (shortest, then lexicographic)
        self.reached = []  # (id, path) for every public item at every path
        self.external = []  # (path, target) for re-exports of items outside this crate's JSON
        self.unknown = set()  # JSON shapes this renderer does not know (reported on stderr)
        self.self_path = {}  # id -> path to print for the item a block is about

    # ---------------------------------------------------------------- reachability

    def item(self, id_):
        return self.index.get(str(id_)) if id_ is not None else None

    def walk(self):
        seen = set()
        self.reached.append((self.root, (self.crate,)))
        self._walk_module(self.root, (self.crate,), seen)
        for id_, path in self.reached:
            best = self.canonical.get(id_)
            if best is None or (len(path), path) < (len(best), best):
                self.canonical[id_] = path

    def _walk_module(self, mod_id, prefix, seen):
        key = (str(mod_id), prefix)
        if key in seen:
            return
        seen.add(key)
        items = [self.item(i) for i in payload(self.item(mod_id)["inner"])["items"]]
        items = [it for it in items if it is not None]
        explicit = set()
        globs = []
        items = [it for it in items if it["visibility"] == "public" or kind_of(it["inner"]) == "impl"]
        for it in items:
            k = kind_of(it["inner"])
            if k == "use":
                u = it["inner"]["use"]
                if u["is_glob"]:
                    globs.append(u)
                    continue
                explicit.add(u["name"])
            elif it.get("name") is not None and k != "impl":
                explicit.add(it["name"])
        for it in items:
            k = kind_of(it["inner"])
            if k == "impl":
                continue
            if k == "use":
                u = it["inner"]["use"]
                if u["is_glob"]:
                    continue
                self._reach_use(u, prefix + (u["name"],), seen)
            elif it["visibility"] == "public":
                self._reach(it, prefix + (it["name"],), seen)
        # A glob brings in what is not shadowed by a name defined here.
        for u in globs:
            target = self.item(u["id"])
            if target is None:
                self.external.append((prefix + ("*",), self._foreign_path(u["id"], u["source"])))
                continue
            tk = kind_of(target["inner"])
            if tk == "module":
                sub = [self.item(i) for i in payload(target["inner"])["items"]]
                for it in sub:
                    if it is None:
                        continue
                    sk = kind_of(it["inner"])
                    if sk == "impl":
                        continue
                    if sk == "use":
                        uu = it["inner"]["use"]
                        if uu["is_glob"]:
                            # Nested globs: reach through the inner module under this prefix.
                            self._walk_glob_module(uu, prefix, seen, explicit)
                        elif uu["name"] not in explicit:
                            self._reach_use(uu, prefix + (uu["name"],), seen)
                    elif it["visibility"] == "public" and it["name"] not in explicit:
                        self._reach(it, prefix + (it["name"],), seen)
            elif tk == "enum":
                for v in payload(target["inner"])["variants"]:
                    vi = self.item(v)
                    if vi is not None and vi["name"] not in explicit:
                        self.reached.append((str(v), prefix + (vi["name"],)))
            else:
                self.unknown.add(f"glob use of a {tk}")

    def _walk_glob_module(self, u, prefix, seen, explicit):
        target = self.item(u["id"])
        if target is None or kind_of(target["inner"]) != "module":
            return
        for it in (self.item(i) for i in payload(target["inner"])["items"]):
            if it is None or kind_of(it["inner"]) in ("impl", "use"):
                continue
            if it["visibility"] == "public" and it["name"] not in explicit:
                self._reach(it, prefix + (it["name"],), seen)

    def _reach_use(self, u, path, seen):
        target = self.item(u["id"])
        if target is None:
            self.external.append((path, self._foreign_path(u["id"], u["source"])))
            return
        self._reach(target, path, seen)

    def _reach(self, it, path, seen):
        k = kind_of(it["inner"])
        if k == "module":
            self.reached.append((str(it["id"]), path))
            self._walk_module(it["id"], path, seen)
        elif k == "use":
            self._reach_use(it["inner"]["use"], path, seen)
        else:
            self.reached.append((str(it["id"]), path))

    def _foreign_path(self, id_, written):
        s = self.paths.get(str(id_)) if id_ is not None else None
        return "::".join(s["path"]) if s else written

    # ---------------------------------------------------------------- types

    def path_name(self, id_, written):
        if id_ is not None:
            sid = str(id_)
            if sid in self.self_path:
                return "::".join(self.self_path[sid])
            if sid in self.canonical:
                return "::".join(self.canonical[sid])
            s = self.paths.get(sid)
            if s:
                full = "::".join(s["path"])
                return PRELUDE.get(full, full)
        return written

    def path(self, p):
        return self.path_name(p.get("id"), p.get("path", p.get("name", "?"))) + self.generic_args(
            p.get("args")
        )

    def generic_args(self, a):
        if not a:
            return ""
        k = kind_of(a)
        if k == "angle_bracketed":
            b = a["angle_bracketed"]
            parts = [self.generic_arg(x) for x in b.get("args", [])]
            parts += [self.constraint(c) for c in b.get("constraints", b.get("bindings", []))]
            return "<" + ", ".join(parts) + ">" if parts else ""
        if k == "parenthesized":
            b = a["parenthesized"]
            out = "(" + ", ".join(self.ty(t) for t in b["inputs"]) + ")"
            if b.get("output") is not None:
                out += " -> " + self.ty(b["output"])
            return out
        if k == "return_type_notation":
            return "(..)"
        self.unknown.add(f"generic args {k}")
        return "<?>"

    def generic_arg(self, g):
        if g == "infer":
            return "_"
        k = kind_of(g)
        if k == "lifetime":
            return g["lifetime"]
        if k == "type":
            return self.ty(g["type"])
        if k == "const":
            return self.const_expr(g["const"])
        self.unknown.add(f"generic arg {k}")
        return "?"

    def const_expr(self, c):
        if isinstance(c, str):
            return c
        return c.get("expr") or c.get("value") or "_"

    def constraint(self, c):
        s = c["name"] + self.generic_args(c.get("args"))
        b = c["binding"]
        k = kind_of(b)
        if k == "equality":
            return s + " = " + self.term(b["equality"])
        if k == "constraint":
            return s + ": " + self.bounds(b["constraint"])
        self.unknown.add(f"constraint {k}")
        return s + " ?"

    def term(self, t):
        k = kind_of(t)
        if k == "type":
            return self.ty(t["type"])
        if k == "constant":
            return self.const_expr(t["constant"])
        self.unknown.add(f"term {k}")
        return "?"

    def hrtb(self, params):
        ps = [self.generic_param(p) for p in params or []]
        ps = [p for p in ps if p is not None]
        return "for<" + ", ".join(ps) + "> " if ps else ""

    def bound(self, b):
        k = kind_of(b)
        if k == "trait_bound":
            t = b["trait_bound"]
            mod = {"none": "", "maybe": "?", "maybe_const": "[const] "}.get(t.get("modifier", "none"))
            if mod is None:
                self.unknown.add(f"bound modifier {t.get('modifier')}")
                mod = ""
            return self.hrtb(t.get("generic_params")) + mod + self.path(t["trait"])
        if k == "outlives":
            return b["outlives"]
        if k == "use":
            args = []
            for a in b["use"]:
                if isinstance(a, str):
                    args.append(a)
                else:
                    args.append(next(iter(a.values())))
            return "use<" + ", ".join(args) + ">"
        self.unknown.add(f"bound {k}")
        return "?"

    def bounds(self, bs):
        return " + ".join(self.bound(b) for b in bs)

    def ty(self, t, nested=False):
        if t is None:
            return "()"
        if t == "infer":
            return "_"
        k = kind_of(t)
        v = payload(t)
        if k == "resolved_path":
            return self.path(v)
        if k == "generic":
            return v
        if k == "primitive":
            return v
        if k == "tuple":
            inner = [self.ty(x) for x in v]
            return "(" + inner[0] + ",)" if len(inner) == 1 else "(" + ", ".join(inner) + ")"
        if k == "slice":
            return "[" + self.ty(v) + "]"
        if k == "array":
            return "[" + self.ty(v["type"]) + "; " + v["len"] + "]"
        if k == "borrowed_ref":
            lt = v.get("lifetime")
            return "&" + (lt + " " if lt else "") + ("mut " if v["is_mutable"] else "") + self.ty(
                v["type"], nested=True
            )
        if k == "raw_pointer":
            return ("*mut " if v["is_mutable"] else "*const ") + self.ty(v["type"], nested=True)
        if k == "dyn_trait":
            parts = [self.hrtb(p.get("generic_params")) + self.path(p["trait"]) for p in v["traits"]]
            if v.get("lifetime"):
                parts.append(v["lifetime"])
            s = "dyn " + " + ".join(parts)
            return "(" + s + ")" if nested and len(parts) > 1 else s
        if k == "impl_trait":
            s = "impl " + self.bounds(v)
            return "(" + s + ")" if nested and len(v) > 1 else s
        if k == "function_pointer":
            return self.fn_pointer(v)
        if k == "qualified_path":
            self_ty = self.ty(v["self_type"])
            name = v["name"] + self.generic_args(v.get("args"))
            if v.get("trait") is None:
                return self_ty + "::" + name
            return "<" + self_ty + " as " + self.path(v["trait"]) + ">::" + name
        if k == "pat":
            return self.ty(v["type"]) + " is " + v.get("__pat_unstable_do_not_use", "_")
        self.unknown.add(f"type {k}")
        return "?"

    def abi(self, header):
        abi = header.get("abi", "Rust")
        if abi == "Rust":
            return ""
        if isinstance(abi, str):
            return f'extern "{abi}" '
        name, v = next(iter(abi.items()))
        if name == "Other":
            return f"extern {v} "
        unwind = isinstance(v, dict) and v.get("unwind")
        return f'extern "{name}{"-unwind" if unwind else ""}" '

    def fn_pointer(self, v):
        h = v.get("header", {})
        sig = v["sig"]
        ins = [self.ty(t) for _, t in sig["inputs"]]
        if sig.get("is_c_variadic"):
            ins.append("...")
        s = self.hrtb(v.get("generic_params"))
        s += "unsafe " if h.get("is_unsafe") else ""
        s += self.abi(h) + "fn(" + ", ".join(ins) + ")"
        if sig.get("output") is not None:
            s += " -> " + self.ty(sig["output"])
        return s

    # ---------------------------------------------------------------- generics

    def generic_param(self, p):
        k = kind_of(p["kind"])
        v = payload(p["kind"])
        if k == "lifetime":
            out = v.get("outlives") or []
            return p["name"] + (": " + " + ".join(out) if out else "")
        if k == "type":
            if v.get("is_synthetic"):
                return None  # `impl Trait` in argument position: shown in the argument.
            s = p["name"]
            if v.get("bounds"):
                s += ": " + self.bounds(v["bounds"])
            if v.get("default") is not None:
                s += " = " + self.ty(v["default"])
            return s
        if k == "const":
            s = "const " + p["name"] + ": " + self.ty(v["type"])
            if v.get("default") is not None:
                s += " = " + v["default"]
            return s
        self.unknown.add(f"generic param {k}")
        return p["name"]

    def generics(self, g):
        ps = [self.generic_param(p) for p in (g or {}).get("params", [])]
        ps = [p for p in ps if p is not None]
        return "<" + ", ".join(ps) + ">" if ps else ""

    def where_clause(self, g):
        preds = []
        for w in (g or {}).get("where_predicates", []):
            k = kind_of(w)
            v = payload(w)
            if k == "bound_predicate":
                preds.append(
                    self.hrtb(v.get("generic_params")) + self.ty(v["type"]) + ": " + self.bounds(v["bounds"])
                )
            elif k == "lifetime_predicate":
                preds.append(v["lifetime"] + ": " + " + ".join(v["outlives"]))
            elif k == "eq_predicate":
                preds.append(self.ty(v["lhs"]) + " = " + self.term(v["rhs"]))
            else:
                self.unknown.add(f"where predicate {k}")
        return " where " + ", ".join(preds) if preds else ""

    # ---------------------------------------------------------------- items

    def fn_sig(self, name, f):
        h = f["header"]
        q = ""
        q += "const " if h.get("is_const") else ""
        q += "async " if h.get("is_async") else ""
        q += "unsafe " if h.get("is_unsafe") else ""
        q += self.abi(h)
        args = []
        for n, t in f["sig"]["inputs"]:
            if n == "self":
                tk = kind_of(t) if t != "infer" else "infer"
                if tk == "generic" and t["generic"] == "Self":
                    args.append("self")
                    continue
                if tk == "borrowed_ref" and t["borrowed_ref"]["type"] == {"generic": "Self"}:
                    r = t["borrowed_ref"]
                    lt = r.get("lifetime")
                    args.append("&" + (lt + " " if lt else "") + ("mut " if r["is_mutable"] else "") + "self")
                    continue
            args.append(f"{n}: {self.ty(t)}")
        if f["sig"].get("is_c_variadic"):
            args.append("...")
        s = f"{q}fn {name}{self.generics(f['generics'])}({', '.join(args)})"
        if f["sig"].get("output") is not None:
            s += " -> " + self.ty(f["sig"]["output"])
        return s + self.where_clause(f["generics"])

    def attrs_prefix(self, it):
        for a in it.get("attrs", []):
            if a == "non_exhaustive" or (isinstance(a, str) and "non_exhaustive" in a):
                return "#[non_exhaustive] "
            if isinstance(a, dict) and "non_exhaustive" in str(a.get("other", "")):
                return "#[non_exhaustive] "
        return ""

    def impl_lines(self, impl_ids, type_path):
        """Lines for the impls of a type: public inherent items and written trait impls."""
        out = []
        for iid in impl_ids:
            it = self.item(iid)
            if it is None:
                continue
            im = it["inner"]["impl"]
            if im.get("is_synthetic") or im.get("blanket_impl") is not None:
                continue
            if im.get("trait") is None:
                out += self.inherent_lines(im, type_path)
            else:
                out.append((R_TRAIT_IMPL, "", self.trait_impl_line(im)))
        return out

    def inherent_lines(self, im, type_path):
        out = []
        self_ty = self.ty(im["for"])
        g = im.get("generics") or {}
        if g.get("params") or g.get("where_predicates"):
            out.append((R_IMPL, "", f"impl{self.generics(g)} {self_ty}{self.where_clause(g)}"))
        for mid in im["items"]:
            m = self.item(mid)
            if m is None or m["visibility"] != "public":
                continue
            k = kind_of(m["inner"])
            v = payload(m["inner"])
            name = f"{self_ty}::{m['name']}"
            if k == "function":
                out.append((R_METHOD, m["name"], "pub " + self.fn_sig(name, v)))
            elif k == "assoc_const":
                val = v.get("value", v.get("default"))
                out.append(
                    (R_ASSOC, m["name"], f"pub const {name}: {self.ty(v['type'])}" + (f" = {val}" if val else ""))
                )
            elif k == "assoc_type":
                out.append((R_ASSOC, m["name"], f"pub type {name} = {self.ty(v.get('type'))}"))
            else:
                self.unknown.add(f"inherent impl item {k}")
        return out

    def trait_impl_line(self, im):
        g = im.get("generics") or {}
        s = "unsafe " if im.get("is_unsafe") else ""
        s += "impl" + self.generics(g) + " " + ("!" if im.get("is_negative") else "")
        s += self.path(im["trait"]) + " for " + self.ty(im["for"]) + self.where_clause(g)
        assoc = []
        for mid in im["items"]:
            m = self.item(mid)
            if m is None:
                continue
            k = kind_of(m["inner"])
            v = payload(m["inner"])
            if k == "assoc_type":
                assoc.append(f"type {m['name']}{self.generics(v.get('generics'))} = {self.ty(v.get('type'))}")
            elif k == "assoc_const":
                val = v.get("value", v.get("default"))
                assoc.append(f"const {m['name']}: {self.ty(v['type'])}" + (f" = {val}" if val else ""))
        if assoc:
            s += " { " + "; ".join(sorted(assoc)) + " }"
        return s

    def fields_inline(self, ids, stripped):
        parts = []
        for fid in ids:
            f = self.item(fid)
            if f is not None:
                parts.append(f"{f['name']}: {self.ty(f['inner']['struct_field'])}")
        if stripped:
            parts.append("..")
        return "{ " + ", ".join(parts) + " }" if parts else "{}"

    def tuple_inline(self, ids, public_kw):
        parts = []
        for fid in ids:
            f = self.item(fid) if fid is not None else None
            if f is None:
                parts.append("_")
            else:
                pub = "pub " if public_kw and f["visibility"] == "public" else ""
                parts.append(pub + self.ty(f["inner"]["struct_field"]))
        return "(" + ", ".join(parts) + ")"

    def block(self, sid, path):
        """(sort key, lines) for one item at one path."""
        it = self.index[sid]
        k = kind_of(it["inner"])
        v = payload(it["inner"])
        p = "::".join(path)
        self.self_path = {sid: path}
        lines = []  # (rank, name, text)
        nx = self.attrs_prefix(it)
        if k == "module":
            lines.append((R_HEAD, "", f"pub mod {p}"))
        elif k in ("struct", "union"):
            g = v["generics"]
            head = f"{nx}pub {k} {p}{self.generics(g)}"
            kind = v.get("kind", {"plain": {"fields": v.get("fields", []), "has_stripped_fields": False}})
            if k == "union":
                kind = {"plain": {"fields": v["fields"], "has_stripped_fields": v.get("has_stripped_fields")}}
            kk = kind_of(kind)
            if kk == "unit":
                lines.append((R_HEAD, "", head + self.where_clause(g) + ";"))
            elif kk == "tuple":
                lines.append((R_HEAD, "", head + self.tuple_inline(kind["tuple"], True) + self.where_clause(g) + ";"))
            else:
                pl = kind["plain"]
                stripped = "  // + private fields" if pl.get("has_stripped_fields") else ""
                lines.append((R_HEAD, "", head + self.where_clause(g) + stripped))
                for fid in pl["fields"]:
                    f = self.item(fid)
                    if f is not None and f["visibility"] == "public":
                        lines.append((R_MEMBER, "", f"pub {p}::{f['name']}: {self.ty(f['inner']['struct_field'])}"))
            lines += self.impl_lines(v["impls"], path)
        elif k == "enum":
            g = v["generics"]
            stripped = "  // + private variants" if v.get("has_stripped_variants") else ""
            lines.append((R_HEAD, "", f"{nx}pub enum {p}{self.generics(g)}{self.where_clause(g)}{stripped}"))
            for vid in v["variants"]:
                var = self.item(vid)
                if var is not None:
                    lines.append((R_MEMBER, "", "pub " + self.variant(var, p)))
            lines += self.impl_lines(v["impls"], path)
        elif k == "variant":  # brought in by a glob re-export of an enum
            owner = next(
                (e for e, ev in self.index.items() if kind_of(ev["inner"]) == "enum" and it["id"] in payload(ev["inner"])["variants"]),
                None,
            )
            of = f"  // variant of {self.path_name(owner, '?')}" if owner else ""
            lines.append((R_HEAD, "", "pub " + self.variant(it, "::".join(path[:-1])) + of))
        elif k == "trait":
            g = v["generics"]
            q = ("unsafe " if v.get("is_unsafe") else "") + ("auto " if v.get("is_auto") else "")
            sup = ": " + self.bounds(v["bounds"]) if v.get("bounds") else ""
            lines.append((R_HEAD, "", f"pub {q}trait {p}{self.generics(g)}{sup}{self.where_clause(g)}"))
            for mid in v["items"]:
                m = self.item(mid)
                if m is None:
                    continue
                mk = kind_of(m["inner"])
                mv = payload(m["inner"])
                name = f"{p}::{m['name']}"
                if mk == "function":
                    prov = "  // provided" if mv.get("has_body") else ""
                    lines.append((R_METHOD, m["name"], self.fn_sig(name, mv) + prov))
                elif mk == "assoc_type":
                    s = f"type {name}{self.generics(mv.get('generics'))}"
                    if mv.get("bounds"):
                        s += ": " + self.bounds(mv["bounds"])
                    s += self.where_clause(mv.get("generics"))
                    if mv.get("type") is not None:
                        s += " = " + self.ty(mv["type"])
                    lines.append((R_ASSOC, m["name"], s))
                elif mk == "assoc_const":
                    val = mv.get("value", mv.get("default"))
                    lines.append(
                        (R_ASSOC, m["name"], f"const {name}: {self.ty(mv['type'])}" + (f" = {val}" if val else ""))
                    )
                else:
                    self.unknown.add(f"trait item {mk}")
            for iid in v.get("implementations", []):
                im = self.item(iid)
                if im is None:
                    continue
                imv = im["inner"]["impl"]
                if imv.get("is_synthetic") or imv.get("blanket_impl") is not None:
                    continue
                lines.append((R_TRAIT_IMPL, "", self.trait_impl_line(imv)))
        elif k == "trait_alias":
            lines.append((R_HEAD, "", f"pub trait {p}{self.generics(v['generics'])} = {self.bounds(v['params'])}"))
        elif k == "function":
            lines.append((R_HEAD, "", "pub " + self.fn_sig(p, v)))
        elif k == "constant":
            c = v["const"]
            val = f" = {c['expr']}" if c.get("is_literal") else ""
            lines.append((R_HEAD, "", f"pub const {p}: {self.ty(v['type'])}{val}"))
        elif k == "static":
            m = "mut " if v.get("is_mutable") else ""
            u = "unsafe " if v.get("is_unsafe") else ""
            lines.append((R_HEAD, "", f"pub {u}static {m}{p}: {self.ty(v['type'])}"))
        elif k == "type_alias":
            g = v["generics"]
            lines.append((R_HEAD, "", f"pub type {p}{self.generics(g)}{self.where_clause(g)} = {self.ty(v['type'])}"))
        elif k == "macro":
            lines.append((R_HEAD, "", f"pub macro {p}!"))
        elif k == "proc_macro":
            lines.append((R_HEAD, "", f"pub proc-macro {v.get('kind', '')} {p}"))
        elif k == "extern_crate":
            lines.append((R_HEAD, "", f"pub extern crate {p} = {v['name']}"))
        elif k == "extern_type":
            lines.append((R_HEAD, "", f"pub extern type {p}"))
        elif k == "primitive":
            lines.append((R_HEAD, "", f"pub primitive {p}"))
        else:
            self.unknown.add(f"item {k}")
            lines.append((R_HEAD, "", f"pub ?{k} {p}"))
        self.self_path = {}
        # Same line from two impls (or a trait impl listed under the trait and the type): once.
        return sorted(set(lines))

    def variant(self, var, enum_path):
        vv = var["inner"]["variant"]
        kind = vv["kind"]
        nx = self.attrs_prefix(var)
        s = f"{nx}{enum_path}::{var['name']}"
        kk = kind_of(kind)
        if kk == "tuple":
            s += self.tuple_inline(kind["tuple"], False)
        elif kk == "struct":
            st = kind["struct"]
            s += " " + self.fields_inline(st["fields"], st.get("has_stripped_fields"))
        if vv.get("discriminant"):
            s += " = " + vv["discriminant"]["expr"]
        return s

    def render(self):
        self.walk()
        blocks = {}
        for sid, path in self.reached:
            if (sid, path) in blocks:
                continue
            blocks[(sid, path)] = self.block(sid, path)
        for path, target in self.external:
            blocks[("", path)] = [(R_HEAD, "", f"pub use {'::'.join(path)} -> {target}")]
        order = sorted(blocks, key=lambda key: (key[1], blocks[key][0][2] if blocks[key] else ""))
        out = []
        for key in order:
            out.append("\n".join(text for _, _, text in blocks[key]))
        return "\n\n".join(out) + "\n"


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: public_api.py CRATE.json")
    with open(sys.argv[1]) as f:
        doc = json.load(f)
    fmt = doc.get("format_version")
    print(f"public-api: rustdoc JSON format version {fmt}", file=sys.stderr)
    if fmt not in SUPPORTED_FORMATS:
        known = ", ".join(str(v) for v in sorted(SUPPORTED_FORMATS))
        sys.exit(
            f"public-api: rustdoc JSON format version {fmt} is not one this script reads ({known}); "
            "the toolchain's rustdoc changed its JSON format. Check .ci/public_api.py against the "
            "new format (rustdoc-types' changelog) and add the version to SUPPORTED_FORMATS."
        )
    if doc.get("includes_private"):
        sys.exit("public-api: this JSON documents private items too (--document-private-items); run rustdoc without it")
    api = Api(doc)
    text = api.render()
    if api.unknown:
        sys.exit(
            "public-api: rustdoc JSON has shapes this script does not render: "
            + ", ".join(sorted(api.unknown))
        )
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
