# Freeze microcot into a custom MicroPython build, keeping the board's own frozen modules:
#   make -C micropython/ports/esp32 BOARD=ESP32_GENERIC FROZEN_MANIFEST=$PWD/firmware/manifest.py
#   make -C micropython/ports/rp2 BOARD=RPI_PICO_W FROZEN_MANIFEST=$PWD/firmware/manifest.py
# Frozen bytecode runs from flash, so the package then costs almost no heap to import.
# The board's own manifest, not the port's: RPI_PICO_W's adds the networking bundle (ntptime, mip,
# requests) on top of the port's, which the example application needs to set its clock.
include("$(BOARD_DIR)/manifest.py")
package("microcot")
# firmware/umqtt (umqtt.simple/robust over microcot's client) is not frozen here: the board's
# manifest may freeze micropython-lib's umqtt under the same names (the ESP32's does), and the
# freezer keeps both. `microcot deploy` puts ours at /umqtt, which comes first in sys.path.
