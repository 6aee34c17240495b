# microcot /boot.py: MicroPython runs it at every boot and soft reset, before /main.py.
# It finishes or undoes an application update (c8y_SoftwareUpdate, microcot/appswitch.py) and
# starts the trial of a new one, so that main.py is always a complete application. Only when
# /app.new or /app.old exists (an update under way) is its code loaded; it is dropped again
# before main.py, whose agent needs the heap. Your own boot.py must do the same, first.
import os


def _switch():
    for d in ("/app.new", "/app.old"):
        try:
            os.stat(d)
        except OSError:
            continue
        import sys

        import microcot

        try:
            from microcot import appswitch

            appswitch.boot()
        except Exception as e:  # main.py must still run: an error here is only reported
            print("boot.py: application switch: %r" % (e,))
        finally:
            for m in ("appswitch", "store"):
                sys.modules.pop("microcot." + m, None)
                if m in microcot.__dict__:
                    delattr(microcot, m)
        return


_switch()
del _switch
