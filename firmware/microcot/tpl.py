# The template ids of the agent's SmartREST collection (firmware/templates.csv), in one place:
# every agent module names them from here (tests/host/test_tpl.py checks this table against the
# csv: request ids against its 10 rows, response ids against its 11 rows, and that every
# template of the csv is named here). A new operation: one response template row in the csv, one
# name here, one agent.operation(...) call.
try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


# request templates (10 rows)
LOOKUP = const(100)  # look up the ID as external ID
CREATE = const(101)  # create the device (ID, name)
EXTID = const(102)  # register the ID as external ID
HARDWARE = const(103)  # hardware and firmware
MOBILE_IMSI = const(104)  # mobile: ICCID and IMSI
MOBILE = const(105)  # mobile: ICCID only
OPERATIONS = const(106)  # supported operations and logs
AVAILABILITY = const(107)  # c8y_RequiredAvailability (minutes)
CONFIGURATION = const(108)  # c8y_Configuration: the device's settings, secrets masked
MEASURE = const(110)
EVENT = const(111)
LOCATION = const(112)
ALARM = const(113)
ALARM_STATUS = const(114)
LOGFILE = const(115)  # a log file's event (answered by R_LOGFILE_EVENT)
CHILD = const(120)  # child device (template A)
LINK = const(121)  # link it (template B)
EXECUTING = const(130)
SUCCESSFUL = const(131)
FAILED = const(132)
RESULT = const(133)  # SUCCESSFUL with a c8y_Command result
LOG_DONE = const(134)  # SUCCESSFUL with the c8y_LogfileRequest and its file's URL
TENANT = const(140)  # own tenant
DELETE = const(199)  # delete this collection
PENDING = const(500)  # pending operations (the MQTT connector's, seed 002: mandatory)

# response templates (11 rows)
R_EXTID = const(200)
R_DEVICE = const(201)
R_COMMAND = const(202)  # c8y_Command operation: id, device, text
R_RESTART = const(203)  # c8y_Restart operation: id, device
R_CHILD = const(204)
R_TENANT = const(205)
R_ALARM = const(206)
R_FIRMWARE = const(207)  # c8y_Firmware: id, device, name, version, url, sha256
R_SOFTWARE = const(208)  # c8y_SoftwareUpdate, its first entry: name, version, url, action, sha256
R_CONFIG = const(209)  # c8y_Configuration: id, device, config
R_SEND_CONFIG = const(210)  # c8y_SendConfiguration: id, device
R_LOGFILE = const(211)  # c8y_LogfileRequest: logFile, dateFrom, dateTo, searchText, maximumLines
R_LOGFILE_EVENT = const(212)  # the log file's event: id, operation id
