"""Hardware behind small interfaces: GPIO (gpiozero), later camera and modem."""
