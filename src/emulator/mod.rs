//! The local Chat emulator (being built).
