# Freeze microcot into a custom MicroPython build, keeping the port's own frozen modules:
#   make -C micropython/ports/esp32 BOARD=ESP32_GENERIC FROZEN_MANIFEST=$PWD/firmware/manifest.py
#   make -C micropython/ports/rp2 BOARD=RPI_PICO_W FROZEN_MANIFEST=$PWD/firmware/manifest.py
# Frozen bytecode runs from flash, so the package then costs almost no heap to import.
include("$(PORT_DIR)/boards/manifest.py")
package("microcot")
