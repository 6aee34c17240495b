"""The template collection the host tests register: seed 002's self-creation conversation,
one template per step, plus measurements, events, alarms, child devices, operations, tenant."""

# Seed 002's self-creation collection, one template per step, as in the engine's tests.
TEMPLATES = [
    # check the own ICCID -> 87,1,X-ID / RTID,2,ICCID,MO-ID or 50,2,404,Not Found
    "10,100,GET,/identity/externalIds/c8y_Serial/%%,,application/json,%%,STRING,",
    # create the device: TID,ICCID,DeviceName
    "10,101,POST,/inventory/managedObjects,application/json,application/json,%%,STRING STRING,"
    '"{""c8y_Hardware"":{""serialNumber"":""%%""},""name"":""%%"",""type"":""c8y_MQTTDevice"",'
    '""c8y_IsDevice"":{},""com_cumulocity_model_Agent"":{}}"',
    # register the ICCID as external ID: TID,MO-ID,ICCID
    "10,102,POST,/identity/globalIds/%%/externalIds,application/json,application/json,%%,"
    'UNSIGNED STRING,"{""type"":""c8y_Serial"",""externalId"":""%%""}"',
    # hardware and mobile info
    "10,103,PUT,/inventory/managedObjects/%%,application/json,application/json,%%,"
    'UNSIGNED STRING STRING STRING STRING,"{""c8y_Mobile"":{""iccid"":""%%"",""imsi"":""%%""},'
    '""c8y_Firmware"":{""version"":""%%""},""c8y_Hardware"":{""model"":""%%""}}"',
    # supported operations: TID,MO-Id
    "10,104,PUT,/inventory/managedObjects/%%,application/json,application/json,%%,UNSIGNED,"
    '"{""c8y_SupportedOperations"":[""c8y_Command"",""c8y_Restart""]}"',
    # measurement: fragment, series, value, unit, time, MO, type (seed: 395.3 °C)
    "10,105,POST,/measurement/measurements,application/json,application/json,%%,"
    "STRING STRING NUMBER STRING DATE UNSIGNED STRING,"
    '"{""%%"":{""%%"":{""value"":%%,""unit"":""%%""}},""time"":""%%"",""source"":{""id"":""%%""},'
    '""type"":""%%""}"',
    # event with the geo position: time, MO, longitude, altitude, latitude
    "10,106,POST,/event/events,application/json,application/json,%%,"
    'DATE UNSIGNED NUMBER NUMBER NUMBER,"{""time"":""%%"",""source"":{""id"":""%%""},'
    '""type"":""c8y_LocationUpdate"",""text"":""Location"",'
    '""c8y_Position"":{""lng"":%%,""alt"":%%,""lat"":%%}}"',
    # alarm: type, time, text, status, severity, MO
    "10,107,POST,/alarm/alarms,application/json,application/json,%%,"
    'STRING DATE STRING STRING STRING UNSIGNED,"{""type"":""%%"",""time"":""%%"",""text"":""%%"",'
    '""status"":""%%"",""severity"":""%%"",""source"":{""id"":""%%""}}"',
    # child devices: template A creates (no c8y_IsDevice), template B links
    "10,108,POST,/inventory/managedObjects,application/json,application/json,%%,STRING,"
    '"{""name"":""%%"",""type"":""c8y_ChildDevice"",""c8y_IsChildDevice"":{}}"',
    "10,109,POST,/inventory/managedObjects/%%/childDevices,application/json,application/json,%%,"
    'UNSIGNED UNSIGNED,"{""managedObject"":{""id"":""%%""}}"',
    # operation status updates
    "10,110,PUT,/devicecontrol/operations/%%,application/json,application/json,%%,UNSIGNED,"
    '"{""status"":""EXECUTING""}"',
    "10,111,PUT,/devicecontrol/operations/%%,application/json,application/json,%%,"
    "UNSIGNED STRING STRING STRING,"
    '"{""status"":""%%"",""c8y_Command"":{""result"":""%%"",""text"":""%%""}}"',
    "10,112,PUT,/devicecontrol/operations/%%,application/json,application/json,%%,"
    'UNSIGNED STRING,"{""status"":""FAILED"",""failureReason"":""%%""}"',
    # own tenant ("Eigenen Tenant abfragen")
    "10,113,GET,/tenant/currentTenant,,application/json,,,",
    # delete a template collection (seed: each collection should hold one) and a NOW measurement
    "10,114,DELETE,/inventory/managedObjects/%%,,,%%,UNSIGNED,",
    "10,115,POST,/measurement/measurements,application/json,application/json,%%,NOW UNSIGNED NUMBER,"
    '"{""time"":""%%"",""source"":{""id"":""%%""},""type"":""c8y_T"",""c8y_Temperature"":{""T"":{""value"":%%,""unit"":""C""}}}"',
    # pending operations, used by the connector only
    "10,500,GET,/devicecontrol/operations?status=PENDING&agentId=%%,,application/json,%%,UNSIGNED,",
    "11,200,,$.externalId,$.externalId,$.managedObject.id",
    '11,201,,"$.c8y_IsDevice","$.id"',
    "11,202,$.operations,$.c8y_Command,$.id,$.deviceId,$.c8y_Command.text",
    "11,203,$.operations,$.c8y_Restart,$.id,$.deviceId",
    "11,204,,$.c8y_IsChildDevice,$.id",
    "11,205,,$.domainName,$.name,$.domainName",
    "11,206,,$.severity,$.id,$.status,$.count,$.text",
    "11,207,,$.c8y_Temperature,$.id,$.c8y_Temperature.0.value,$.c8y_Temperature.0.unit",
    "11,208,,$.c8y_Position,$.id,$.c8y_Position.lat",
]
