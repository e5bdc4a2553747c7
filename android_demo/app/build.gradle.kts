plugins {
    alias(libs.plugins.android.application)
    alias(libs.plugins.kotlin.android)
    alias(libs.plugins.kotlin.compose)
}

android {
    namespace = "dev.edgemtp.demo"
    compileSdk = 36

    defaultConfig {
        applicationId = "dev.edgemtp.demo"
        minSdk = 31
        targetSdk = 36
        versionCode = 1
        versionName = "0.1"
        ndk { abiFilters += listOf("arm64-v8a") }
    }

    buildTypes {
        release {
            isMinifyEnabled = false
            signingConfig = signingConfigs.getByName("debug")
        }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }

    buildFeatures { compose = true }

    // The native runtimes are loaded from the APK uncompressed.
    packaging { jniLibs { useLegacyPackaging = false } }
}

kotlin {
    jvmToolchain(17)
}

dependencies {
    implementation(project(":spec-core"))

    implementation(platform(libs.compose.bom))
    implementation(libs.compose.ui)
    implementation(libs.compose.material3)
    implementation(libs.compose.ui.tooling.preview)
    debugImplementation(libs.compose.ui.tooling)
    implementation(libs.activity.compose)
    implementation(libs.lifecycle.viewmodel.compose)
    implementation(libs.lifecycle.runtime.compose)
    implementation(libs.coroutines.android)

    // Path 1: the LiteRT-LM engine (what AI Edge Gallery runs).
    implementation(libs.litertlm.android)
    // Path 2: our own draft/verify loop (spec-core) on LiteRT CompiledModel.
    implementation(libs.litert)
    implementation(libs.litert.gpu)
}
