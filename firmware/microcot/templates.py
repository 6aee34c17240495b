"""A SmartREST 1.0 template collection: the templates a device registers under its X-ID.

Registration body (published once on ms/<ID>, answered with `20,<collection MO id>`):

    15,<X-ID>
    10,<id>,<method>,<uri>,<content type>,<accept>,<placeholder>,<param types>,<template>
    11,<id>,<base>,<condition>,<value>[,<value>...]

`10` rows are request templates: method GET, POST, PUT or DELETE; <param types> is one field of
space-separated types (STRING UNSIGNED INTEGER NUMBER DATE NOW); every occurrence of
<placeholder> in <uri> and then in <template> takes the next parameter, so their count must equal
the number of types. NOW takes no value from the device: the platform fills in the time, so
`types_of(tid)`, the binary type list, leaves it out. `11` rows are response templates: JsonPaths
for the base object (empty means `$`; a list yields one row per element), a condition that must
exist, and the values to extract.

Every defect raises TemplateError (a ValueError) whose `.message` is the platform's 41 text
(`Duplicate message identifiers are not allowed`, `Bad value type: FOO`,
`No content type supported for GET templates.`, ...), `.line` the 1-based line of the
registration body (the `15,` line is line 1) when known, and `.detail` what exactly was wrong.
Decisions where the platform documents no rule: template ids are integers 0..4294967295 and must
not be one of the built-in message identifiers (10, 11, 15, 20, 40-43, 45, 50, 61, 70, 80-84, 86, 87), which
keeps smartrest.parse unambiguous; an unknown method is a "Bad request template definition";
JsonPaths must start with `$`. A registration body that is not valid SmartREST CSV
(smartrest.Error: an unterminated quote, bytes that are not UTF-8, a row of over
smartrest.MAX_FIELDS fields, ...) is E_CSV with that error's line and `column C, field F: what`
as detail, and a missing or bad `15,<X-ID>` line is E_XID on line 1: the platform documents no
text for either.

Errors (`ERRORS`): from_body(), from_rows(), add_row(), add_request() and add_response() raise
TemplateError and nothing else, for any body or rows of str fields (a template id is refused by
its length before int() sees it: smartrest.MAX_DIGITS). Collection(xid) raises plain ValueError
for a bad X-ID passed by a caller; types_of() KeyError for an id not registered.

The collection used first must hold a GET template 500 (pending operations) for the device to
receive operations: `has_operations_template()`.
"""

from . import smartrest

PARAM_TYPES = ("STRING", "UNSIGNED", "INTEGER", "NUMBER", "DATE", "NOW")
METHODS = ("GET", "POST", "PUT", "DELETE")
RESERVED_IDS = (10, 11, 15, 20, 40, 41, 42, 43, 45, 50, 61, 70, 80, 81, 82, 83, 84, 86, 87)
OPERATIONS_ID = 500

E_DUPLICATE = "Duplicate message identifiers are not allowed"
E_REQUEST = "Bad request template definition"
E_RESPONSE = "Bad response template definition"
E_PATTERN = "Bad pattern"
E_ID = "Not a valid message identifier for template creation"
E_JSONPATH = "Invalid JsonPath"
E_LIST = "Using JsonPath to refer to a list of objects is not allowed for SmartRest"
E_FILTER = "Using Filters (?) in JsonPath is not allowed for SmartRest"
E_VALUES = "Values are only supported for templates with placeholder."
E_CSV = "Malformed template line"
E_XID = "Bad X-ID line"


class TemplateError(ValueError):
    """A template the platform would refuse with 41: `.code` 41, `.message` its text, `.line` the
    line of the registration body (or None), `.detail` what was wrong."""

    def __init__(self, message, line=None, detail=None):
        super().__init__(message)
        self.code = 41
        self.message = message
        self.line = line
        self.detail = detail

    def __str__(self):
        s = "41 "
        if self.line is not None:
            s += "line %d: " % self.line
        s += self.message
        if self.detail:
            s += " (%s)" % self.detail
        return s

    def smartrest(self):
        """The response row the platform would send: `41,<line>,<message>` or `41,<message>`."""
        if self.line is None:
            return smartrest.row((41, self.message))
        return smartrest.row((41, self.line, self.message))


ERRORS = (TemplateError,)


class Request:
    """A request template (`10,` row)."""

    __slots__ = ("tid", "method", "uri", "content_type", "accept", "placeholder", "params",
                 "template")

    def __init__(self, tid, method, uri, content_type, accept, placeholder, params, template):
        self.tid = tid
        self.method = method
        self.uri = uri
        self.content_type = content_type
        self.accept = accept
        self.placeholder = placeholder
        self.params = params
        self.template = template

    def row(self):
        return [10, self.tid, self.method, self.uri, self.content_type, self.accept,
                self.placeholder, " ".join(self.params), self.template]

    def binary_types(self):
        return [t for t in self.params if t != "NOW"]

    def __eq__(self, other):
        return isinstance(other, Request) and self.row() == other.row()

    def __ne__(self, other):
        return not self.__eq__(other)

    def __repr__(self):
        return "Request(%r)" % (self.row(),)


class Response:
    """A response template (`11,` row)."""

    __slots__ = ("tid", "base", "condition", "values")

    def __init__(self, tid, base, condition, values):
        self.tid = tid
        self.base = base
        self.condition = condition
        self.values = values

    def row(self):
        return [11, self.tid, self.base, self.condition] + self.values

    def __eq__(self, other):
        return isinstance(other, Response) and self.row() == other.row()

    def __ne__(self, other):
        return not self.__eq__(other)

    def __repr__(self):
        return "Response(%r)" % (self.row(),)


def _clip(v):
    return smartrest._clip(v) if isinstance(v, str) else v


def _text(v, err, line, what):
    if v is None:
        return ""
    if not isinstance(v, str):
        raise TemplateError(err, line, "%s must be a str, got %r" % (what, v))
    return v


def _check_path(path, line, can_be_empty):
    if not path:
        if can_be_empty:
            return
        raise TemplateError(E_JSONPATH, line, "empty JsonPath")
    if "?" in path:
        raise TemplateError(E_FILTER, line, path)
    if "*" in path or ".." in path:
        raise TemplateError(E_LIST, line, path)
    if path[0] != "$" or path[-1] == "." or path.count("[") != path.count("]"):
        raise TemplateError(E_JSONPATH, line, path)
    i = path.find("[")
    while i >= 0:
        j = path.find("]", i)
        inner = path[i + 1 : j]
        if j < 0 or ":" in inner or "," in inner:
            raise TemplateError(E_LIST, line, path)
        i = path.find("[", j)


class Collection:
    """Templates registered under one X-ID, in registration order."""

    def __init__(self, xid):
        smartrest.check_xid(xid)
        self.xid = xid
        self._items = []
        self._ids = {}

    # -- building ---------------------------------------------------------------------------

    def _tid(self, tid, line):
        if isinstance(tid, str):
            t = smartrest._uint(tid.strip())
        elif isinstance(tid, int) and not isinstance(tid, bool) and tid >= 0:
            t = tid
        else:
            t = None
        if t is None or t > 0xFFFFFFFF or t in RESERVED_IDS:
            raise TemplateError(E_ID, line, "id %r" % (_clip(tid),))
        if t in self._ids:
            raise TemplateError(E_DUPLICATE, line, "id %d" % t)
        return t

    def add_request(self, tid, method, uri, content_type="", accept="", placeholder="", params=(),
                    template="", line=None):
        """Add and return a Request; TemplateError if the platform would refuse it."""
        t = self._tid(tid, line)
        method = _text(method, E_REQUEST, line, "method").strip()
        uri = _text(uri, E_REQUEST, line, "URI").strip()
        ctype = _text(content_type, E_REQUEST, line, "content type").strip()
        accept = _text(accept, E_REQUEST, line, "accept").strip()
        ph = _text(placeholder, E_REQUEST, line, "placeholder").strip()
        template = _text(template, E_REQUEST, line, "template")
        if isinstance(params, str):
            params = params.split()
        else:
            params = [_text(p, E_REQUEST, line, "parameter type").strip() for p in params]
        if method not in METHODS:
            raise TemplateError(E_REQUEST, line, "method %r is not GET, POST, PUT or DELETE" % method)
        if not uri:
            raise TemplateError(E_REQUEST, line, "empty URI")
        if method in ("GET", "DELETE"):
            if ctype:
                raise TemplateError("No content type supported for %s templates." % method, line)
            if template:
                raise TemplateError("No template string supported for %s templates." % method, line)
        else:
            if not ctype:
                raise TemplateError("No content type found for %s templates." % method, line)
            if not template:
                raise TemplateError("No template string found for %s templates." % method, line)
        for p in params:
            if p not in PARAM_TYPES:
                raise TemplateError("Bad value type: %s" % p, line)
        if params and not ph:
            raise TemplateError(E_VALUES, line)
        if ph:
            n = uri.count(ph) + template.count(ph)
            if n != len(params):
                raise TemplateError(E_PATTERN, line, "placeholder %r occurs %d times for %d parameters"
                                    % (ph, n, len(params)))
        r = Request(t, method, uri, ctype, accept, ph, params, template)
        self._items.append(r)
        self._ids[t] = r
        return r

    def add_response(self, tid, base, condition, values, line=None):
        """Add and return a Response; TemplateError if the platform would refuse it."""
        t = self._tid(tid, line)
        base = _text(base, E_RESPONSE, line, "base")
        condition = _text(condition, E_RESPONSE, line, "condition")
        if isinstance(values, str):
            values = [values]
        values = [_text(v, E_RESPONSE, line, "value path") for v in values]
        if not values:
            raise TemplateError(E_RESPONSE, line, "no value paths")
        _check_path(base, line, True)
        _check_path(condition, line, True)
        for v in values:
            _check_path(v, line, False)
        r = Response(t, base, condition, values)
        self._items.append(r)
        self._ids[t] = r
        return r

    def add_row(self, fields, line=None):
        """Add a template from the fields of one `10,` or `11,` row (as smartrest.parse_rows gives)."""
        kind = str(fields[0]).strip() if fields else ""
        if kind == "10":
            if len(fields) < 8 or len(fields) > 9:
                raise TemplateError(E_REQUEST, line, "10 row has %d fields, expected 9" % len(fields))
            f = list(fields[1:]) + [""] * (9 - len(fields))
            return self.add_request(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], line)
        if kind == "11":
            if len(fields) < 5:
                raise TemplateError(E_RESPONSE, line, "11 row has %d fields, expected 5 or more"
                                    % len(fields))
            return self.add_response(fields[1], fields[2], fields[3], list(fields[4:]), line)
        raise TemplateError(E_ID, line, "row starts with %r; a registration has only 10 and 11 rows"
                            % _clip(kind))

    @classmethod
    def from_rows(cls, rows, xid=None):
        """A collection from rows of str fields. The first row may be `15,<X-ID>`; without it pass
        xid. Line numbers in errors count that `15` row (present or not) as line 1."""
        rows = list(rows)
        if rows and rows[0] and str(rows[0][0]).strip() == "15":
            if len(rows[0]) != 2:
                raise TemplateError(E_XID, 1, "expected 15,<X-ID>, got %d fields" % len(rows[0]))
            xid = rows[0][1]
            rows = rows[1:]
        if xid is None:
            raise TemplateError(E_XID, 1, "a registration starts with 15,<X-ID>")
        try:
            c = cls(xid)
        except ValueError as e:
            raise TemplateError(E_XID, 1, str(e)) from None
        for i, fields in enumerate(rows, 2):
            c.add_row(fields, i)
        return c

    @classmethod
    def from_body(cls, body):
        """A collection from a registration body (bytes or str) `15,<X-ID>\\n10,...\\n11,...`."""
        try:
            rows = smartrest.parse_rows(body)
        except smartrest.Error as e:
            where = "column %d" % e.column
            if e.field is not None:
                where += ", field %d" % e.field
            raise TemplateError(E_CSV, e.line, "%s: %s" % (where, e.what)) from None
        return cls.from_rows(rows)

    # -- using ------------------------------------------------------------------------------

    def rows(self):
        """The template rows (lists of values), without the `15` line."""
        return [t.row() for t in self._items]

    def registration(self):
        """The registration body (bytes): `15,<X-ID>` and one line per template."""
        return smartrest.request(self.xid, self.rows())

    def request(self, tid):
        """The Request with that id, or None."""
        r = self._ids.get(tid)
        return r if isinstance(r, Request) else None

    def response(self, tid):
        """The Response with that id, or None."""
        r = self._ids.get(tid)
        return r if isinstance(r, Response) else None

    def types_of(self, tid):
        """Binary value types of request template tid (its parameters without NOW)."""
        r = self.request(tid)
        if r is None:
            raise KeyError("no request template %r in collection %s" % (tid, self.xid))
        return r.binary_types()

    def lookup(self, xid, tid):
        """binrest.decode's lookup: the binary types, or None for an unknown X-ID or template."""
        if xid != self.xid:
            return None
        r = self.request(tid)
        return None if r is None else r.binary_types()

    def response_ids(self):
        return [t.tid for t in self._items if isinstance(t, Response)]

    def has_operations_template(self):
        """True when template 500 is a GET request template (needed to receive operations)."""
        r = self.request(OPERATIONS_ID)
        return r is not None and r.method == "GET"

    def encode(self, tid, values):
        """A binary SmartREST message for request template tid (values without NOW ones)."""
        from . import binrest

        return binrest.encode(self.xid, tid, self.types_of(tid), values)

    def body(self, rows):
        """A SmartREST text request body of rows for this collection."""
        return smartrest.request(self.xid, rows)

    def __len__(self):
        return len(self._items)

    def __iter__(self):
        return iter(self._items)

    def __eq__(self, other):
        return isinstance(other, Collection) and self.xid == other.xid and self._items == other._items

    def __ne__(self, other):
        return not self.__eq__(other)

    def __repr__(self):
        return "Collection(%r, %d templates)" % (self.xid, len(self._items))
