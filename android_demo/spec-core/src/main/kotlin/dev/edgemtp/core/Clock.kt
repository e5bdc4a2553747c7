package dev.edgemtp.core

/** A monotonic time source in nanoseconds; tests substitute a fake one. */
fun interface Clock {
    /** Current time in nanoseconds from an arbitrary origin. */
    fun nanoTime(): Long

    companion object {
        /** The JVM's monotonic clock. */
        val SYSTEM: Clock = Clock { System.nanoTime() }
    }
}
