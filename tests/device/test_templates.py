from dt import raises

from microcot import binrest, smartrest
from microcot import templates as tp
from microcot.templates import Collection, TemplateError

# A registration in the shape the seed and the public SmartREST 1.0 reference use.
BODY = (
    b"15,myXID\n"
    b"10,100,GET,/identity/externalIds/c8y_Serial/%%,,application/vnd.com.nsn.cumulocity.externalId+json,%%,STRING,\n"
    b'10,101,POST,/inventory/managedObjects,application/vnd.com.nsn.cumulocity.managedObject+json,'
    b'application/vnd.com.nsn.cumulocity.managedObject+json,%%,STRING,'
    b'"{""name"":""%%"",""type"":""microcot"",""c8y_IsDevice"":{}}"\n'
    b'10,102,POST,/measurement/measurements,application/vnd.com.nsn.cumulocity.measurement+json,,%%,'
    b'NOW UNSIGNED NUMBER,"{""time"":""%%"",""source"":{""id"":""%%""},""type"":""c8y_T"",'
    b'""c8y_T"":{""T"":{""value"":%%,""unit"":""C""}}}"\n'
    b"10,103,PUT,/devicecontrol/operations/%%, application/vnd.com.nsn.cumulocity.operation+json,"
    b' application/vnd.com.nsn.cumulocity.operation+json,%%,UNSIGNED,"{""status"":""SUCCESSFUL""}"\n'
    b"10,104,DELETE,/inventory/managedObjects/%%,,,%%,UNSIGNED,\n"
    b"10,500,GET,/devicecontrol/operations?agentId=%%&status=PENDING,,"
    b"application/vnd.com.nsn.cumulocity.operationCollection+json,%%,UNSIGNED,\n"
    b'11,600,,"$.c8y_IsDevice","$.id"\n'
    b"11,601,$.managedObject,$.externalId,$.managedObject.id\n"
    b'11,602,$.operations,$.c8y_Command,$.id,$.c8y_Command.text,"$.deviceId"'
)


def _coll():
    return Collection.from_body(BODY)


def test_from_body_reads_every_field():
    c = _coll()
    assert c.xid == "myXID" and len(c) == 9
    r = c.request(102)
    assert (r.tid, r.method, r.uri) == (102, "POST", "/measurement/measurements")
    assert r.content_type == "application/vnd.com.nsn.cumulocity.measurement+json"
    assert r.accept == "" and r.placeholder == "%%"
    assert r.params == ["NOW", "UNSIGNED", "NUMBER"]
    assert r.template.startswith('{"time":"%%","source":{"id":"%%"}')
    # unquoted header fields with a leading space (as in the public reference) are trimmed
    assert c.request(103).content_type == "application/vnd.com.nsn.cumulocity.operation+json"
    s = c.response(602)
    assert (s.tid, s.base, s.condition) == (602, "$.operations", "$.c8y_Command")
    assert s.values == ["$.id", "$.c8y_Command.text", "$.deviceId"]
    assert c.response(600).base == ""
    assert c.request(600) is None and c.response(100) is None and c.request(999) is None
    assert [t.tid for t in c] == [100, 101, 102, 103, 104, 500, 600, 601, 602]
    assert c.response_ids() == [600, 601, 602]


def test_registration_roundtrip():
    c = _coll()
    body = c.registration()
    assert body.startswith(b"15,myXID\n10,100,GET,")
    assert not body.endswith(b"\n")
    again = Collection.from_body(body)
    assert again == c
    assert again.registration() == body
    assert Collection.from_rows(smartrest.parse_rows(body)) == c
    assert Collection.from_rows(smartrest.parse_rows(body)[1:], "myXID") == c


def test_built_by_api_renders_exact_body():
    c = Collection("devXID")
    c.add_request(500, "GET", "/devicecontrol/operations?agentId=%%&status=PENDING", "",
                  "application/json", "%%", ["UNSIGNED"])
    c.add_request("110", "POST", "/alarm/alarms", "application/json", "application/json", "%%",
                  "STRING DATE STRING", '{"type":"%%","time":"%%","text":"%%"}')
    c.add_response(610, "", "$.c8y_IsDevice", ["$.id"])
    assert c.registration() == (
        b"15,devXID\n"
        b"10,500,GET,/devicecontrol/operations?agentId=%%&status=PENDING,,application/json,%%,UNSIGNED,\n"
        b'10,110,POST,/alarm/alarms,application/json,application/json,%%,STRING DATE STRING,'
        b'"{""type"":""%%"",""time"":""%%"",""text"":""%%""}"\n'
        b"11,610,,$.c8y_IsDevice,$.id"
    )
    assert c.request(110).tid == 110


def test_types_of_leaves_now_out():
    c = _coll()
    assert c.types_of(102) == ["UNSIGNED", "NUMBER"]
    assert c.types_of(100) == ["STRING"]
    assert c.types_of(104) == ["UNSIGNED"]
    raises(KeyError, c.types_of, 600)
    raises(KeyError, c.types_of, 999)
    assert c.lookup("myXID", 102) == ["UNSIGNED", "NUMBER"]
    assert c.lookup("otherXID", 102) is None
    assert c.lookup("myXID", 999) is None


def test_binary_by_template():
    c = _coll()
    msg = c.encode(102, [4711, 21.5])
    assert msg == b"myXID\x00\x00\x66\x00\x00\x12\x67\x41\xac\x00\x00"
    payload = msg + c.encode(103, [42])
    assert binrest.decode(payload, c.lookup) == [("myXID", 102, [4711, 21.5]), ("myXID", 103, [42])]
    e = raises(binrest.Error, binrest.decode, b"myXID\x00\x02\x58", c.lookup)  # 600: a response
    assert e.code == 43
    raises(ValueError, c.encode, 102, [4711])


def test_operations_template():
    assert _coll().has_operations_template()
    c = Collection("myXID")
    assert not c.has_operations_template()
    c.add_request(500, "POST", "/x", "application/json", "", "", "", "{}")
    assert not c.has_operations_template()


def _e41(body, message, line):
    e = raises(TemplateError, Collection.from_body, body)
    assert isinstance(e, ValueError)
    assert e.code == 41 and e.message == message, (body, e.message)
    assert e.line == line, (body, e.line)
    return e


def test_41_errors_carry_the_platform_text():
    h = "15,X1\n10,100,GET,/a,,,,,\n"
    _e41(h + "11,100,,$.a,$.b", "Duplicate message identifiers are not allowed", 3)
    _e41(h + "10,100,POST,/b,a/b,,,,{}", "Duplicate message identifiers are not allowed", 3)
    _e41(h + "10,101,FETCH,/a,,,,,", "Bad request template definition", 3)
    _e41(h + "10,101,GET,,,,,,", "Bad request template definition", 3)
    _e41(h + "10,101,GET,/a,,,", "Bad request template definition", 3)
    _e41(h + "10,101,GET,/a,,,,,,", "Bad request template definition", 3)
    _e41(h + "10,101,GET,/a,application/json,,,,", "No content type supported for GET templates.", 3)
    _e41(h + "10,101,DELETE,/a,text/plain,,,,", "No content type supported for DELETE templates.", 3)
    _e41(h + "10,101,GET,/a,,,,,{}", "No template string supported for GET templates.", 3)
    _e41(h + "10,101,DELETE,/a,,,,,{}", "No template string supported for DELETE templates.", 3)
    _e41(h + "10,101,POST,/a,,,,,{}", "No content type found for POST templates.", 3)
    _e41(h + "10,101,PUT,/a,,,,,{}", "No content type found for PUT templates.", 3)
    _e41(h + "10,101,POST,/a,a/b,,,,", "No template string found for POST templates.", 3)
    _e41(h + "10,101,PUT,/a,a/b,,,,", "No template string found for PUT templates.", 3)
    _e41(h + "10,101,GET,/a/%%,,,%%,FLOAT,", "Bad value type: FLOAT", 3)
    _e41(h + "10,101,GET,/a/%%,,,%%,STRING now,", "Bad value type: now", 3)
    _e41(h + "10,101,GET,/a/%%,,,,STRING,", "Values are only supported for templates with placeholder.", 3)
    _e41(h + "10,101,GET,/a/%%,,,%%,STRING UNSIGNED,", "Bad pattern", 3)
    _e41(h + "10,101,GET,/a/%%/%%,,,%%,STRING,", "Bad pattern", 3)
    _e41(h + "11,101,,$.a", "Bad response template definition", 3)
    _e41(h + "11,101,,a.b,$.id", "Invalid JsonPath", 3)
    _e41(h + "11,101,,$.a,", "Invalid JsonPath", 3)
    _e41(h + "11,101,,$.a[,$.id", "Invalid JsonPath", 3)
    _e41(h + "11,101,,$.a,$.b[?(@.x==1)]", "Using Filters (?) in JsonPath is not allowed for SmartRest", 3)
    _e41(h + "11,101,$.list[*],$.a,$.id",
         "Using JsonPath to refer to a list of objects is not allowed for SmartRest", 3)
    _e41(h + "11,101,,$..id,$.id",
         "Using JsonPath to refer to a list of objects is not allowed for SmartRest", 3)
    _e41(h + "11,101,,$.a,$.b[0:2]",
         "Using JsonPath to refer to a list of objects is not allowed for SmartRest", 3)
    for bad in ("x", "-1", "50", "87", "15", "4294967296"):
        _e41("15,X1\n10," + bad + ",GET,/a,,,,,", "Not a valid message identifier for template creation", 2)
    _e41(h + "12,101,a", "Not a valid message identifier for template creation", 3)


def test_template_error_text_and_row():
    e = _e41("15,X1\n10,100,GET,/a/%%,,,%%,STRING,\n11,100,,$.a,$.b",
             "Duplicate message identifiers are not allowed", 3)
    assert str(e) == "41 line 3: Duplicate message identifiers are not allowed (id 100)"
    assert e.smartrest() == "41,3,Duplicate message identifiers are not allowed"
    e = raises(TemplateError, Collection("X1").add_request, 100, "GET", "/a", "", "", "%%", "FOO")
    assert e.line is None and str(e) == "41 Bad value type: FOO"
    assert e.smartrest() == "41,Bad value type: FOO"


def test_api_errors():
    raises(ValueError, Collection, "12345")
    raises(ValueError, Collection, "")
    raises(TemplateError, Collection.from_body, b"10,100,GET,/a,,,,,")
    raises(TemplateError, Collection.from_rows, [["10", "100", "GET", "/a", "", "", "", "", ""]])
    c = Collection("X1")
    raises(TemplateError, c.add_request, True, "GET", "/a")
    raises(TemplateError, c.add_request, 100, "GET", 5)
    raises(TemplateError, c.add_response, 100, "", "$.a", [])
    assert len(c) == 0
    c.add_response(100, None, None, "$.id")
    assert c.response(100).values == ["$.id"] and c.response(100).condition == ""
    assert tp.PARAM_TYPES == ("STRING", "UNSIGNED", "INTEGER", "NUMBER", "DATE", "NOW")
