// Pure Kotlin/JVM: no Android imports, so it also compiles and tests without the Android SDK
// (see run_tests.sh, which the CI uses instead of Gradle).
plugins {
    alias(libs.plugins.kotlin.jvm)
}

kotlin {
    jvmToolchain(17)
}

dependencies {
    testImplementation(libs.junit)
}

tasks.test {
    systemProperty("edgemtp.testdata", file("testdata").absolutePath)
}
