from dt import Rng, raises

from microcot import smartrest as sr
from microcot.smartrest import Record


def test_quote_plain_values_stay_bare():
    assert sr.quote("ICCID") == "ICCID"
    assert sr.quote("Kesseltemperatur stark erhoeht") == "Kesseltemperatur stark erhoeht"
    assert sr.quote("2017-09-14T12:37:00.000") == "2017-09-14T12:37:00.000"
    assert sr.quote("°C") == "°C"
    assert sr.quote("") == ""
    assert sr.quote(None) == ""


def test_quote_when_needed():
    assert sr.quote("a,b") == '"a,b"'
    assert sr.quote('say "hi"') == '"say ""hi"""'
    assert sr.quote('"') == '""""'
    assert sr.quote("two\nlines") == '"two\nlines"'
    assert sr.quote("cr\rhere") == '"cr\rhere"'
    assert sr.quote("tab\there") == '"tab\there"'
    assert sr.quote(" lead") == '" lead"'
    assert sr.quote("trail ") == '"trail "'
    assert sr.quote(" ") == '" "'


def test_quote_numbers_and_bools():
    assert sr.quote(0) == "0"
    assert sr.quote(-17) == "-17"
    assert sr.quote(4294967296) == "4294967296"
    assert sr.quote(395.3) == "395.3"
    assert sr.quote(-0.5) == "-0.5"
    assert sr.quote(1.0) == "1.0"
    assert sr.quote(True) == "true"
    assert sr.quote(False) == "false"
    assert sr.quote(b"bytes") == "bytes"
    raises(ValueError, sr.quote, float("inf"))
    raises(ValueError, sr.quote, float("nan"))


def test_request_seed_examples():
    assert sr.request("myXID", [[100, "89490200001234567890"]]) == b"15,myXID\n100,89490200001234567890"
    body = sr.request(
        "myXID",
        [(102, "Kesseltemperatur", "2017-09-14T12:37:00.000", "Kesseltemperatur stark erhoeht",
          "ACTIVE", "MAJOR", 4711)],
    )
    assert body == (b"15,myXID\n102,Kesseltemperatur,2017-09-14T12:37:00.000,"
                    b"Kesseltemperatur stark erhoeht,ACTIVE,MAJOR,4711")
    # several rows, one per line, no trailing newline; line n+1 holds row n
    body = sr.request("myXID", [[101, "Child, one"], ["103", 12, 34], [104]])
    assert body == b'15,myXID\n101,"Child, one"\n103,12,34\n104'
    assert sr.request("myXID", []) == b"15,myXID"


def test_request_errors():
    raises(ValueError, sr.request, "", [[100]])
    e = raises(ValueError, sr.request, "12345", [[100]])
    assert "letter" in str(e)
    raises(ValueError, sr.request, "my,XID", [[100]])
    raises(ValueError, sr.request, "my XID", [[100]])
    e = raises(ValueError, sr.request, "myXID", [[100], "101,a"])
    assert "line 3" in str(e)
    e = raises(ValueError, sr.request, "myXID", [[100], [101], ["x1", 2]])
    assert "line 4" in str(e) and "x1" in str(e)
    raises(ValueError, sr.request, "myXID", [[-1]])
    raises(ValueError, sr.request, "myXID", [[]])


def test_parse_seed_responses():
    assert sr.parse(b"87,1,myXID\n601,2,89490200001234567890,12345") == [
        Record(87, None, ["1", "myXID"]),
        Record(601, 2, ["89490200001234567890", "12345"]),
    ]
    assert sr.parse("50,2,404,Not Found") == [Record(50, 2, ["404", "Not Found"])]
    assert sr.parse(b"20,12345") == [Record(20, None, ["12345"])]
    assert sr.parse(b'40,"No template for this X-ID."') == [
        Record(40, None, ["No template for this X-ID."])
    ]


def test_parse_line_number_rules():
    body = (
        b"41,Duplicate message identifiers are not allowed\n"
        b"41,3,Bad value type: FOO\n"
        b"41\n"
        b"42,2,Malformed Request\n"
        b"43,4,Invalid message identifier\n"
        b"45,5,Wrong number of arguments\n"
        b"70,2,dev1,t123,device_dev1,secret\n"
        b"86,30000,10000,retry\n"
        b"87,2,myXID\n"
        b"600,7,a,,b\n"
        b"601,,x\n"
    )
    assert sr.parse(body) == [
        Record(41, None, ["Duplicate message identifiers are not allowed"]),
        Record(41, 3, ["Bad value type: FOO"]),
        Record(41, None, []),
        Record(42, 2, ["Malformed Request"]),
        Record(43, 4, ["Invalid message identifier"]),
        Record(45, 5, ["Wrong number of arguments"]),
        Record(70, 2, ["dev1", "t123", "device_dev1", "secret"]),
        Record(86, None, ["30000", "10000", "retry"]),
        Record(87, None, ["2", "myXID"]),
        Record(600, 7, ["a", "", "b"]),
        Record(601, None, ["x"]),
    ]


def test_parse_response_ids_keeps_foreign_rows_raw():
    got = sr.parse(b"600,2,a\n999,b,c\n50,3,500,Boom", response_ids=(600,))
    assert got == [Record(600, 2, ["a"]), Record(999, None, ["b", "c"]), Record(50, 3, ["500", "Boom"])]


def test_parse_csv_rules():
    body = b'511,1,123,"ls -l\nwc, -l","say ""hi""",  spaced  \r\n\r\n512,1,"",\n'
    assert sr.parse(body) == [
        Record(511, 1, ["123", "ls -l\nwc, -l", 'say "hi"', "  spaced  "]),
        Record(512, 1, ["", ""]),
    ]
    assert sr.parse(b"") == []
    assert sr.parse(b"\n\n") == []
    assert sr.parse_rows('a,"b\r\nc"\r\n,\n"x"') == [["a", "b\r\nc"], ["", ""], ["x"]]


def test_parse_errors_name_line_and_column():
    e = raises(sr.Error, sr.parse, '20,1\n511,1,"a"b,c')
    assert (e.line, e.column, e.field) == (2, 10, 3)
    assert raises(sr.Error, sr.parse, b"20,1\n\xff").field is None  # not inside a row
    cases = (
        ('20,1\n511,1,"abc', "line 2 column 7", "unterminated"),
        ('20,1\n\n511,1,"a"b', "line 3 column 10", "after closing quote"),
        ('511,1,a"b', "line 1 column 8", "quote"),
        ("x1,2", "line 1 column 1", "not an unsigned integer"),
        ("-5,2", "line 1 column 1", "not an unsigned integer"),
        ('600,1,"a\nb"\n50,x,404', "line 3 column 4", "line number"),
        ("50", "line 1 column 3", "lacks its line number"),
        ("511,1,a\rb", "line 1 column 8", "carriage return"),
        (b"20,1\n511,1,\xc3(", "line 2 column 7", "UTF-8"),
    )
    for body, where, what in cases:
        e = raises(sr.Error, sr.parse, body)
        assert where in str(e) and what in str(e), (body, str(e))
        assert "line %d column %d: %s" % (e.line, e.column, e.what) == str(e)
        e2 = raises(sr.Error, lambda: list(sr.records(body)))
        assert str(e2) == str(e)


def test_record_repr_and_equality():
    r = Record(50, 2, ["404", "Not Found"])
    assert repr(r) == "Record(50, 2, ['404', 'Not Found'])"
    assert r == Record(50, 2, ["404", "Not Found"])
    assert r != Record(50, 3, ["404", "Not Found"])
    assert r != Record(50, 2, ["404"])
    assert r != (50, 2, ["404", "Not Found"])
    assert (r.code, r.line, r.values) == (50, 2, ["404", "Not Found"])


def test_quote_parse_roundtrip_random():
    alphabet = 'ab ,"\n\r\tZ9\u00e4-'
    r = Rng(3)
    for _ in range(40):
        vals = []
        for _ in range(1 + r.below(4)):
            vals.append("".join(alphabet[r.below(len(alphabet))] for _ in range(r.below(7))))
        body = sr.request("myXID", [[600] + vals])
        rows = sr.parse_rows(body)
        assert rows == [["15", "myXID"], ["600"] + vals], (body, rows)
